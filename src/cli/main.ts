// Runs the kscinc program (started by kscinc.cjs, which sizes the libuv pool first). Also the entry of the
// bundled CLI (scripts/bundle-cli.mjs), hence no top-level await: the bundle is CommonJS.
import { endsWithItsAction, run } from './program.js';
import { UNREAD_LOG_GRACE_MS, logsWaiting, settleLogs } from './log-sink.js';
import { queuedStdio, watchStdio } from './stdio.js';

// stdout and stderr are made on first use only (src/cli/stdio.ts); a closed stdout ends the program quietly.
watchStdio();
// A command that ends with its action (declared with its group, src/cli/program.ts COMMAND_GROUPS) exits at
// once when the action has returned. Not while the build writes code caches (scripts/bundle-train.cjs runs
// several commands in one process).
const endsEarly = process.env.KSCINC_CODE_CACHE === undefined && endsWithItsAction(process.argv);
/** process.exit once what stdout and stderr queued (a pipe's slow reader) is written: exit would drop it. */
function exitWhenDrained(code: number): void {
  const queued = queuedStdio();
  if (queued.length === 0) process.exit(code);
  let left = queued.length;
  for (const s of queued) s.write('', () => --left === 0 && process.exit(code));
}
run(process.argv).then(
  (code) => {
    process.exitCode = code;
    if (endsEarly) exitWhenDrained(code);
    // settleLogs' timers hold the process (a terminal's sink retries on an unref'd timer of its own).
    else if (logsWaiting() > 0) void settleLogs(UNREAD_LOG_GRACE_MS).then(() => process.exit(code));
  },
  (e: unknown) => {
    process.stderr.write(`kscinc: ${e instanceof Error ? e.message : String(e)}\n`);
    process.exitCode = 1;
  },
);
