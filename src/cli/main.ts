// Runs the kscinc program (started by kscinc.cjs, which sizes the libuv pool first). Also the entry of the
// bundled CLI (scripts/bundle-cli.mjs), hence no top-level await: the bundle is CommonJS.
import { run } from './program.js';

// A closed stdout (`kscinc map … | head`) ends the program quietly, as other Unix tools do.
process.stdout.on('error', (e: NodeJS.ErrnoException) => {
  if (e.code === 'EPIPE') process.exit(0);
  throw e;
});
// A command that ends once its action has returned: it awaited all its work (the image closed, the repository's
// lock released, the summary written: to a file or terminal synchronously; to a pipe whose reader is slow it
// may be queued, so the exit waits for stdout and stderr to drain), so the process ends at once instead of
// tearing down Node's environment handle by handle first
// (≈ 5–11 ms of a small incremental's wall, bench/README.md session 19). Only commands known to leave
// nothing running: others (serve, a server's control) end when their handles close, as before. Not while
// the build writes code caches (scripts/bundle-train.cjs runs several commands in one process).
const ENDS_WITH_ITS_ACTION = new Set(['backup']);
const command = process.env.KSCINC_CODE_CACHE === undefined ? process.argv.slice(2).find((a) => !a.startsWith('-')) : undefined;
/** process.exit once what stdout and stderr queued (a pipe's slow reader) is written: exit would drop it. */
function exitWhenDrained(code: number): void {
  const queued = [process.stdout, process.stderr].filter((s) => s.writableLength > 0);
  if (queued.length === 0) process.exit(code);
  let left = queued.length;
  for (const s of queued) s.write('', () => --left === 0 && process.exit(code));
}
run(process.argv).then(
  (code) => {
    process.exitCode = code;
    if (command !== undefined && ENDS_WITH_ITS_ACTION.has(command) && !process.argv.includes('--help') && !process.argv.includes('-h')) exitWhenDrained(code);
  },
  (e: unknown) => {
    process.stderr.write(`kscinc: ${e instanceof Error ? e.message : String(e)}\n`);
    process.exitCode = 1;
  },
);
