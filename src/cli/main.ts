// Runs the kscinc program (started by kscinc.cjs, which sizes the libuv pool first).
// A closed stdout (`kscinc map … | head`) ends the program quietly, as other Unix tools do.
process.stdout.on('error', (e: NodeJS.ErrnoException) => {
  if (e.code === 'EPIPE') process.exit(0);
  throw e;
});
const { run } = await import('./program.js');
process.exitCode = await run(process.argv);
