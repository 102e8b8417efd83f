// After a successful job (post-if: success()): saves when the `save` input
// says so, then unmounts, and writes the job summary. After a failed job
// nothing is saved: the runner's clean-up stops the mount daemon, which
// unmounts on SIGTERM.
'use strict';
const { config, run, summary, warn } = require('./lib');

const cfg = config();
const mode = process.env.STATE_mode || 'none';
const hit = process.env.STATE_hit || 'miss';
const matched = process.env.STATE_matched || '';
let readBytes = 0;
let requests = 0;
if (mode === 'mount') {
  for (const p of cfg.paths) {
    const s = run(cfg, ['stats', p]);
    if (s.report) {
      readBytes += s.report.bytes_fetched || 0;
      requests += s.report.requests || 0;
    }
  }
}
let saved;
if (cfg.save === 'never') saved = 'not saved (save: never)';
else if (cfg.save === 'on-miss' && hit === 'exact') saved = 'not saved: the key hit exactly';
else if (mode === 'mount' && !cfg.writable) saved = 'not saved: a read-only mount cannot change (set writable: true to update a fallback hit)';
else {
  const s = run(cfg, ['save', '--key', cfg.key, ...cfg.paths]);
  if (s.status === 0 && s.report) saved = `saved as ${cfg.key}: ${s.report.archive_size} bytes archive, ${s.report.bytes_uploaded} bytes uploaded`;
  else {
    saved = 'save failed (see the log above)';
    warn(saved);
  }
}
if (mode === 'mount') {
  for (const p of cfg.paths) {
    if (run(cfg, ['umount', p]).status !== 0 && run(cfg, ['umount', '--lazy', p]).status !== 0) warn(`cannot unmount ${p}`);
  }
}
const how = { mount: 'mounted', restore: 'restored', none: 'no cache for' }[mode];
let line = `**cachemount** \`${cfg.key}\`: **${hit}**${matched ? ` (matched \`${matched}\`)` : ''}, ${how} ${cfg.paths.join(' ')}`;
if (mode === 'mount') line += `; read ${readBytes} bytes in ${requests} requests`;
line += `; ${saved}`;
console.log(line);
summary(line);
