// Runs the kscinc program (started by kscinc.cjs, which sizes the libuv pool first). Also the entry of the
// bundled CLI (scripts/bundle-cli.mjs), hence no top-level await: the bundle is CommonJS.
import { run } from './program.js';

// A closed stdout (`kscinc map … | head`) ends the program quietly, as other Unix tools do.
process.stdout.on('error', (e: NodeJS.ErrnoException) => {
  if (e.code === 'EPIPE') process.exit(0);
  throw e;
});
run(process.argv).then(
  (code) => {
    process.exitCode = code;
  },
  (e: unknown) => {
    process.stderr.write(`kscinc: ${e instanceof Error ? e.message : String(e)}\n`);
    process.exitCode = 1;
  },
);
