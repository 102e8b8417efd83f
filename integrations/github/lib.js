// The cachemount GitHub Action's shared part: inputs, outputs, state, the
// job summary and running the binary. Plain Node, no dependencies, so that
// nothing has to be bundled.
'use strict';
const { spawnSync } = require('child_process');
const fs = require('fs');

function input(name) {
  return (process.env[`INPUT_${name.replace(/ /g, '_').toUpperCase()}`] || '').trim();
}

function lines(name) {
  return input(name).split('\n').map((l) => l.trim()).filter((l) => l !== '');
}

function append(file, text) {
  if (file) fs.appendFileSync(file, text);
}

function setOutput(name, value) {
  append(process.env.GITHUB_OUTPUT, `${name}=${value}\n`);
}

// State the post step reads back as STATE_<name>.
function saveState(name, value) {
  append(process.env.GITHUB_STATE, `${name}=${value}\n`);
}

function summary(markdown) {
  append(process.env.GITHUB_STEP_SUMMARY, `${markdown}\n`);
}

function fail(message) {
  console.log(`::error::cachemount: ${message}`);
  process.exit(1);
}

function warn(message) {
  console.log(`::warning::cachemount: ${message}`);
}

function config() {
  const key = input('key');
  if (!key) fail('the key input is required');
  const paths = lines('path');
  if (paths.length === 0) fail('the path input is required (the paths the cache holds, one per line)');
  const save = input('save') || 'on-miss';
  if (!['always', 'on-miss', 'never'].includes(save)) fail(`save must be always, on-miss or never (not "${save}")`);
  const writable = (input('writable') || 'false') === 'true';
  const env = { ...process.env };
  if (input('store')) env.CACHEMOUNT_STORE = input('store');
  const bin = input('binary') || 'cachemount';
  const found = spawnSync(bin, ['--version'], { env, encoding: 'utf8' });
  if (found.error || found.status !== 0) {
    fail(`the cachemount binary (${bin}) is not on PATH: install it on the runner (cargo install --locked --git <cachemount repository>, see the README's Install section) or set the binary input`);
  }
  return { key, paths, save, writable, env, bin, restoreKeys: lines('restore-keys') };
}

// Runs `cachemount --json ARGS`: its exit code and its JSON report (or null).
function run(cfg, args) {
  const r = spawnSync(cfg.bin, ['--json', '--quiet', ...args], {
    env: cfg.env,
    encoding: 'utf8',
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  let report = null;
  try {
    report = JSON.parse((r.stdout || '').trim().split('\n').pop());
  } catch (e) {
    report = null;
  }
  return { status: r.status === null ? 1 : r.status, report };
}

module.exports = { input, config, run, setOutput, saveState, summary, warn };
