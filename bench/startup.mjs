#!/usr/bin/env node
/**
 * CLI start-up against `node -e 0` (issue 19: goal ≤ 40 ms more). Each command runs `--reps` times, in
 * turn with the others and with `node -e 0` (so load that comes and goes hits all alike), each run in
 * `bash -c 'CMD; times'`: the wall time of the run and the CPU time (user + system) of the command itself,
 * which bash's `times` reports for its children and which other load on the machine hardly changes.
 * The CLI runs as a user runs it: the executable file (its #! line), `node FILE` when it is not executable.
 * Prints per command the median and the range of both, and the median over node -e 0. `X --help` loads
 * X's command group as running X does and ends where X's work would begin: the start-up of X.
 *
 *   node bench/startup.mjs [--reps 20] [--cli dist/cli/kscinc.cjs] [--modes bundle,esm] [--only version,info,worker,…]
 *                          [--peer OTHER/dist/cli/kscinc.cjs]   (adds the mode `peer`: another build, same runs)
 *
 * Modes: `bundle` is the CLI as installed (dist/bundle/, scripts/bundle-cli.mjs); `esm` sets KSCINC_NO_BUNDLE=1
 * (the ES modules in dist/, as before the bundle). Both run in the same rounds. The commands run on
 * a small image and an empty folder repository made in a temporary folder first; `create` makes a new
 * 1 GiB image each run (and removes it), which includes its fsyncs.
 */
import { execFileSync } from 'node:child_process';
import { accessSync, constants as fsConstants, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { parseArgs } from 'node:util';
import { CLI, log } from './lib/kscinc.mjs';
import { median } from './lib/common.mjs';

const { values: opt } = parseArgs({
  options: { reps: { type: 'string', default: '20' }, cli: { type: 'string', default: CLI }, modes: { type: 'string', default: 'bundle,esm' }, only: { type: 'string' }, peer: { type: 'string' } },
});
const reps = Number(opt.reps);
const dir = mkdtempSync(join(tmpdir(), 'kscinc-startup-'));
const img = join(dir, 'a.ksc');
const repo = join(dir, 'repo');
const MODES = { bundle: '', esm: 'KSCINC_NO_BUNDLE=1 ' };
const modes = opt.modes.split(',');
if (opt.peer && !modes.includes('peer')) modes.push('peer');
const node = process.execPath;
const q = (s) => `'${s.replaceAll("'", "'\\''")}'`;
// As a user runs it: the file itself, through its #! line (since session 15 a /bin/sh header that leaves
// NODE_EXTRA_CA_CERTS for the first S3 connection over TLS); `node FILE` for a build that is not executable.
const executable = (f) => {
  try {
    accessSync(f, fsConstants.X_OK);
    return true;
  } catch {
    return false;
  }
};
const cli = (args) => (executable(opt.cli) ? [opt.cli, ...args] : [node, opt.cli, ...args]).map(q).join(' ');

execFileSync(node, [opt.cli, 'create', img, '--size', '1G']);
execFileSync(node, [opt.cli, 'repo', 'init', repo, '--no-encrypt']);

const distDir = join(dirname(opt.cli), '..');
// The worker's entry as src/supervisor/child.ts picks it (a build without the bundled worker: dist/'s).
const workerStart = `const { fork } = require('node:child_process');
const bundled = ${JSON.stringify(join(distDir, 'supervisor', 'bundled-worker.cjs'))};
const entry = process.env.KSCINC_NO_BUNDLE || !require('node:fs').existsSync(bundled) ? ${JSON.stringify(join(distDir, 'supervisor', 'worker.js'))} : bundled;
const w = fork(entry, ['--spare'], { execArgv: ['--expose-gc'] });
w.on('message', (m) => { if (m.t === 'loaded') w.send({ t: 'exit' }); });`;

const ALL = {
  'node -e 0': `${q(node)} -e 0`,
  // Node alone without the CA bundle a machine may name in NODE_EXTRA_CA_CERTS (Node 20 parses it at start).
  'node -e 0, no extra CA': `env -u NODE_EXTRA_CA_CERTS ${q(node)} -e 0`,
  version: cli(['--version']),
  // A command's help loads its command group as a run of it does, and stops where its work would begin.
  'info --help': cli(['info', '--help']),
  'backup --help': cli(['backup', '--help']),
  'serve --help': cli(['serve', '--help']),
  info: cli(['info', img]),
  create: `${cli(['create', join(dir, 'new.ksc'), '--size', '1G'])} && rm ${q(join(dir, 'new.ksc'))}`,
  'bitmap list': cli(['bitmap', 'list', img]),
  backups: cli(['backups', '--repo', repo]),
  // The S3 client's load: a command on an S3 repository without credentials fails right after loading it.
  's3 client': `AWS_ACCESS_KEY_ID= AWS_SECRET_ACCESS_KEY= KSCINC_S3_CONFIG= ${cli(['backups', '--repo', 's3://kscinc-startup'])} 2>/dev/null`,
  // The worker of `kscinc serve` (issue 16): forked as the supervisor forks it, until it says it has loaded;
  // the forking `node -e` is one more `node -e 0` in the figure.
  worker: `${q(node)} -e ${q(workerStart)}`,
};
const only = opt.only ? new Set(opt.only.split(',')) : null;
const BASELINES = ['node -e 0', 'node -e 0, no extra CA'];
const cases = BASELINES.map((n) => [n, ALL[n]]);
for (const [name, cmd] of Object.entries(ALL)) {
  if (BASELINES.includes(name) || (only && !only.has(name))) continue;
  for (const m of modes) cases.push([modes.length > 1 ? `${name} (${m})` : name, m === 'peer' ? cmd.replaceAll(distDir, join(dirname(opt.peer), '..')) : `${MODES[m]}${cmd}`]);
}

/** One run: [wall ms, CPU ms of the command's processes]. */
function once(cmd) {
  const t0 = process.hrtime.bigint();
  const out = execFileSync('bash', ['-c', `${cmd} >/dev/null; times`], { encoding: 'utf8' });
  const wall = Number(process.hrtime.bigint() - t0) / 1e6;
  // `times`: the shell's own user/system, then its children's: "0m0.084s 0m0.028s".
  const [user, sys] = out
    .trim()
    .split('\n')
    .at(-1)
    .split(/\s+/)
    .map((t) => {
      const m = /^(\d+)m([\d.]+)s$/.exec(t);
      return Number(m[1]) * 60_000 + Number(m[2]) * 1000;
    });
  return [wall, user + sys];
}

const wall = new Map(cases.map(([n]) => [n, []]));
const cpu = new Map(cases.map(([n]) => [n, []]));
for (const [, cmd] of cases) once(cmd); // warm the page cache
for (let r = 0; r < reps; r++) {
  const order = r % 2 === 0 ? cases : [...cases].reverse();
  for (const [name, cmd] of order) {
    const [w, c] = once(cmd);
    wall.get(name).push(w);
    cpu.get(name).push(c);
  }
}
rmSync(dir, { recursive: true, force: true });

const fmt = (xs) => `${median(xs).toFixed(0)} (${Math.min(...xs).toFixed(0)}–${Math.max(...xs).toFixed(0)})`;
const base = { wall: median(wall.get('node -e 0')), cpu: median(cpu.get('node -e 0')) };
log(`${reps} runs each, ms: median (range)`);
log('| command | wall | over node -e 0 | CPU (user+sys) | over node -e 0 |');
log('|---|---|---|---|---|');
for (const [name] of cases) {
  const w = wall.get(name);
  const c = cpu.get(name);
  const over = BASELINES.includes(name) ? ['—', '—'] : [`+${(median(w) - base.wall).toFixed(0)}`, `+${(median(c) - base.cpu).toFixed(0)}`];
  log(`| ${name} | ${fmt(w)} | ${over[0]} | ${fmt(c)} | ${over[1]} |`);
}
