// Mounts the cache before the job (or restores it where /dev/fuse is
// missing) and sets the outputs. A cache that cannot be had is a warning,
// never a failed job.
'use strict';
const fs = require('fs');
const { config, run, setOutput, saveState, summary, warn } = require('./lib');

const cfg = config();
const keys = ['--key', cfg.key];
for (const k of cfg.restoreKeys) keys.push('--fallback', k);
let mode = fs.existsSync(process.env.CACHEMOUNT_DEV_FUSE || '/dev/fuse') ? 'mount' : 'restore';
let result;
if (mode === 'mount') {
  // Like a restore, a mount replaces what is at the paths (--force).
  result = run(cfg, ['mount', ...keys, '--force', ...(cfg.writable ? ['--writable'] : []), ...cfg.paths]);
  if (result.status !== 0 && result.status !== 3) {
    warn(`mount failed (exit ${result.status}): restoring instead`);
    mode = 'restore';
  }
}
if (mode === 'restore') result = run(cfg, ['restore', ...keys, ...cfg.paths]);
let hit = result.report && result.report.hit;
if (result.status !== 0 || !hit) {
  if (result.status !== 3) warn(`${mode} failed (exit ${result.status}): the job runs without the cache`);
  hit = 'miss';
  mode = 'none';
}
const matched = (hit !== 'miss' && result.report.matched_key) || '';
setOutput('cache-hit', hit === 'exact' ? 'true' : 'false');
setOutput('cache-matched-key', matched);
setOutput('hit-kind', hit);
saveState('mode', mode);
saveState('hit', hit);
saveState('matched', matched);
if (mode === 'mount') saveState('pid', String(result.report.pid));
const how = { mount: 'mounted', restore: 'restored', none: 'no cache for' }[mode];
console.log(`cachemount: ${hit} for ${cfg.key}${matched ? ` (matched ${matched})` : ''}, ${how} ${cfg.paths.join(' ')}`);
if (hit !== 'miss') {
  summary(`**cachemount** \`${cfg.key}\`: **${hit}** (matched \`${matched}\`), ${how} ${cfg.paths.join(' ')}, archive ${result.report.archive_size} bytes`);
}
