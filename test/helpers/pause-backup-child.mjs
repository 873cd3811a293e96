/**
 * Child process for the paused-backup tests (test/backup/s3.test.ts): backs IMAGE up into REPO (a folder or
 * s3://…, S3 settings from the environment) with the compiled library in dist/, and stops itself with
 * SIGSTOP when the backup reaches progress phase PHASE ("commit": every pack uploaded, no index or
 * manifest yet) — a real pause, as a debugger, a frozen VM or an overloaded host makes one. The parent
 * resumes it with SIGCONT.
 *
 *   node pause-backup-child.mjs IMAGE REPO PHASE
 *
 * stdout: "stopping" just before the SIGSTOP, then one JSON line: {"ok":true,"id"} or {"ok":false,"code","message"}.
 */
import { backupDevice, openKsc, Repository } from '../../dist/index.js';
import { openStore } from '../../dist/objstore/open.js';

const [image, location, phase] = process.argv.slice(2);
const store = await openStore(location, { create: true });
let code = 0;
try {
  const repo = await Repository.open(store);
  const img = await openKsc(image, { write: true });
  let stopped = false;
  try {
    const r = await backupDevice(img, repo, {
      bitmap: null,
      progress: (p) => {
        if (p.phase !== phase || stopped) return;
        stopped = true;
        process.stdout.write('stopping\n');
        process.kill(process.pid, 'SIGSTOP');
      },
    });
    process.stdout.write(`${JSON.stringify({ ok: true, id: r.id })}\n`);
  } finally {
    await img.close();
  }
} catch (e) {
  process.stdout.write(`${JSON.stringify({ ok: false, code: e.code, message: e.message })}\n`);
  code = 3;
} finally {
  await store.close();
}
process.exit(code);
