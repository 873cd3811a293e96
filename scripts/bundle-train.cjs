// The run that writes the CLI bundle's code caches (scripts/bundle-cli.mjs starts it with KSCINC_CODE_CACHE=write):
// `--help` first, which loads every command group, then the commands users time, one after the other in this
// one process: convert, a full and an incremental backup, a restore, info. V8 saves in a script's cache the
// functions compiled until the cache is made (at exit), so a cache written after `--help` alone left every
// function of the work itself to be parsed and compiled at each run (callgrind, session 15: V8's lazy
// compilation was 16 % of an incremental backup's instructions). Each command runs the bundle's entry anew
// (the entry runs the command line in process.argv when loaded); the chunks it shares stay loaded, so their
// scripts collect what every command compiled.
//
//   node scripts/bundle-train.cjs DIST WORKDIR
'use strict';
const { writeFileSync } = require('node:fs');
const { join, sep } = require('node:path');

const [dist, work] = process.argv.slice(2);
const bundle = join(dist, 'bundle');
require(join(dist, 'cli', 'code-cache.cjs')).useCodeCache(bundle + sep);
const entry = join(bundle, 'kscinc.cjs');
const launcher = join(dist, 'cli', 'kscinc.cjs');

const img = join(work, 'a.ksc');
const raw = join(work, 'a.raw');
const repo = join(work, 'repo');
const data = join(work, 'data');
writeFileSync(data, Buffer.alloc(1 << 20, 0x5a));
writeFileSync(raw, Buffer.alloc(4 << 20, 0xa5));
const runs = [
  ['--help'],
  ['convert', '-O', 'kscinc', raw, img],
  ['write', img, '0', '--from', data],
  ['backup', img, '--repo', repo, '--no-encrypt', '--json'],
  ['write', img, '1M', '--from', data],
  ['backup', img, '--repo', repo, '--no-encrypt', '--json'],
  ['restore', 'latest', join(work, 'restored.raw'), '--repo', repo, '--json'],
  ['info', img],
];

/** Runs one command line through the bundle's entry; resolves with its exit status once it has ended. */
function runOnce(args) {
  process.argv = [process.execPath, launcher, ...args];
  process.exitCode = undefined;
  delete require.cache[entry];
  require(entry);
  return new Promise((resolve) => {
    const wait = () => (process.exitCode === undefined ? setTimeout(wait, 5) : resolve(process.exitCode));
    wait();
  });
}

(async () => {
  for (const args of runs) {
    const code = await runOnce(args);
    if (code !== 0) {
      process.stderr.write(`bundle-train: kscinc ${args.join(' ')}: exit status ${code}\n`);
      process.exit(1);
    }
  }
  process.exitCode = 0;
})();
