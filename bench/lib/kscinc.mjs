/**
 * What the benchmark scripts set up alike (bench/run.mjs, bench/live-restore.mjs, races/nbd.mjs): where the
 * bench and the project are, the built `kscinc` executable (package.json's bin, run `npx tsc -p
 * tsconfig.json` first), a line logger, and `kscinc` as a child process: run to its end, or `serve` until
 * it printed its URI.
 */
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

/** The bench folder, and the project's root. */
export const benchDir = dirname(dirname(fileURLToPath(import.meta.url)));
export const root = dirname(benchDir);
/** The `kscinc` executable (dist/cli/kscinc.cjs). */
export const CLI = join(root, JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')).bin.kscinc);

export const log = (s) => process.stdout.write(`${s}\n`);

/** Runs `kscinc ARGV` (`cli`: another executable); resolves with its stdout on exit 0, rejects with its stderr otherwise. */
export function kscinc(argv, { capture = true, cli = CLI } = {}) {
  return new Promise((resolve, reject) => {
    const p = spawn(process.execPath, [cli, ...argv], { stdio: ['ignore', capture ? 'pipe' : 'ignore', 'pipe'] });
    let out = '';
    let err = '';
    p.stdout?.on('data', (d) => (out += d));
    p.stderr.on('data', (d) => (err += d));
    p.once('exit', (code) => (code === 0 ? resolve(out) : reject(new Error(`kscinc ${argv.join(' ')}: exit ${code}: ${err}`))));
  });
}

/**
 * Starts `kscinc serve ARGS` and resolves once it printed a URI line (`nbd://…` or `nbd+unix://…`):
 * { proc, uri, stop }, stop() sending SIGTERM and resolving when it is gone. Rejects when it exits first or
 * prints none within `timeoutMs`.
 */
export function serveKscinc(args, { cli = CLI, timeoutMs = 30_000 } = {}) {
  const p = spawn(process.execPath, [cli, 'serve', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  p.stderr.on('data', (d) => (err += d));
  const exited = new Promise((r) => p.once('exit', r));
  const stop = async () => {
    if (p.exitCode === null && p.signalCode === null) p.kill('SIGTERM');
    await exited;
  };
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`kscinc serve printed no URI in ${timeoutMs} ms: ${err}`)), timeoutMs);
    p.stdout.on('data', (d) => {
      out += d;
      const uri = out
        .split('\n')
        .slice(0, -1)
        .find((l) => /^nbd(\+unix)?:\/\//.test(l));
      if (uri) {
        clearTimeout(t);
        resolve({ proc: p, uri, stop });
      }
    });
    void exited.then((c) => {
      clearTimeout(t);
      reject(new Error(`kscinc serve exited ${c}: ${err}`));
    });
  });
}
