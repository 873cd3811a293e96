/**
 * Session 24, hostile (shared by s24m-peer-kill-*.test.ts): the migration's network peer (the destination
 * `kscinc serve --incoming --no-supervisor`) SIGKILLed outright at a step of the SOURCE, plain and over TLS
 * (X.509): in the first pass (`copied-N`), in a dirty round (`round-frozen`, `round-sent`) and inside the
 * switch-over before the destination's flush (`completing`, `held`, `sent`; from `flushed` on the source may rightly
 * flag itself: test/hostile/s23r-migrate-dst-steps). The source runs with KSCINC_TEST_KILL_AT=migrate@PHASE and
 * KSCINC_TEST_KILL_PEER=<destination pid> (src/util/killpoint.ts). A writer writes to the source all along
 * (FUA, one request at a time). Before the flag step the source must stay the authority whatever the peer
 * did: the migration ends `failed` (status says so), the writer never sees an error, the source holds every
 * acknowledged write, a restarted destination refuses other writers, `kscinc check` finds no error on either (leaks only
 * on the killed destination), and a
 * rerun of `migrate start` resumes and `complete` ends byte-identical with every acknowledged write.
 */
import { join } from 'node:path';
import { expect } from 'vitest';
import type { MigrateStatus } from '../../src/engines/migrate.js';
import { loadClientTls } from '../../src/nbd/client-tls.js';
import { kscincAsync } from '../helpers/cli.js';
import { x509ServeArgs, type Pki } from '../helpers/pki.js';
import { serveListening, type Served } from '../helpers/serve.js';
import { checkClean, destinationTakesOver, sourceIsAuthority } from './migrate-dst-helpers.js';
import { MiB, Writer, makeBaseAndOverlay, rig, serveImage, until, type Rig } from '../migrate/helpers.js';

/** Phases where `migrate complete` is asked (the rest kill during the copy). */
const SWITCH_OVER = new Set(['completing', 'held', 'sent']);

/** The destination, plain or TLS, not supervised (its pid is the process the kill point kills). */
async function serveDst(r: Rig, pki: Pki | null): Promise<Served> {
  if (!pki) return serveImage(r, 'dst.ksc', ['--incoming', '--no-supervisor']);
  const args = [join(r.dir, 'dst.ksc'), '--listen', '127.0.0.1:0', '--export-name', 'dst.ksc', '--incoming', '--no-supervisor', ...x509ServeArgs(pki), '--incoming-peer', 'x509:migration-source'];
  return serveListening(args, { env: r.env, timeoutMs: 30_000 });
}

/** One case: the destination killed at the source's `phase`; returns the line it printed. */
export async function peerKillCase(phase: string, seed: number, pki: Pki | null): Promise<string> {
  const r = rig();
  // `timed-MS`: no kill point; the test SIGKILLs the destination MS ms after `migrate start` answered, in a
  // first pass slowed down (16 MiB at 4 MB/s: at least 4 s) and spread over 4 connections (so requests are in flight on several at once).
  const timed = /^timed-(\d+)$/.exec(phase);
  const slow = phase.startsWith('copied-') || timed !== null;
  makeBaseAndOverlay(r, 'vm.ksc', slow ? 16 : 8);
  expect(r.cli(['create', 'dst.ksc', '--backing', 'base.raw']).code).toBe(0);
  const tlsArgs = pki ? ['--tls-creds', pki.x509] : [];
  let dst = await serveDst(r, pki);
  const killEnv: Record<string, string> = timed ? {} : { KSCINC_TEST_KILL_AT: `migrate@${phase}`, KSCINC_TEST_KILL_PEER: String(dst.child.proc.pid) };
  const src = await serveImage({ ...r, env: { ...r.env, ...killEnv } }, 'vm.ksc', ['--no-supervisor']);
  const w = new Writer(src.uri, seed, 16 * MiB, true);
  let completed: { code: number | null; stdout: string; stderr: string } | null = null;
  let status: MigrateStatus;
  const name = `${pki ? 'TLS' : 'plain'} peer killed at ${phase}`;
  try {
    await w.start();
    await w.atLeast(10);
    r.json<MigrateStatus>(['migrate', 'start', 'vm.ksc', '--to', dst.uri, '--token', dst.token!, ...tlsArgs, ...(slow ? ['--bandwidth', '4M', '--connections', timed ? '4' : '1'] : [])]);
    if (timed) {
      await new Promise((res) => setTimeout(res, Number(timed[1])));
      process.kill(dst.child.proc.pid!, 'SIGKILL');
    }
    if (SWITCH_OVER.has(phase)) {
      await until(r, 'vm.ksc', (x) => x.phase === 'converged', 'converged');
      await w.atLeast(5);
      completed = await kscincAsync(['migrate', 'complete', join(r.dir, 'vm.ksc')], r.env, 60_000);
    }
    status = await until(r, 'vm.ksc', (x) => x.phase === 'failed', `failed after the ${name}`);
    // The status CLI runs synchronously: the source's stderr is read once the event loop turns again.
    const fired = timed ? 'kscinc serve: ready' : `test kill point migrate@${phase}: SIGKILL peer`;
    for (let t = Date.now(); !src.child.stderr().includes(fired) && Date.now() - t < 10_000;) await new Promise((res) => setTimeout(res, 50));
    expect(src.child.stderr(), `the kill point fired (status ${JSON.stringify(status)})`).toContain(fired);
    await dst.child.exited;
    await w.atLeast(5);
  } finally {
    await w.stop().catch(() => undefined);
  }
  const flagged = (JSON.parse(r.cli(['info', 'vm.ksc', '--json']).stdout) as { migratedAway: boolean }).migratedAway;
  const line = `${name}: complete ${completed ? `exit ${completed.code}` : 'not asked'}, status ${status.phase} (${status.error?.code}: ${status.error?.message.slice(0, 100)}), flagged ${flagged}, ${w.writes} writes, writer ${w.failure ? (w.failure as Error & { code?: string }).code : 'ok'}`;
  console.log(line);
  try {
    expect(flagged, `${line}: the source is not flagged before step 5`).toBe(false);
    await sourceIsAuthority(r, src, w, completed, line);
    checkClean(r, 'vm.ksc', line);
    checkClean(r, 'dst.ksc', line, true);
    await destinationTakesOver(r, w, line, async () => (dst = await serveDst(r, pki)), { startArgs: tlsArgs, intruderTls: pki ? loadClientTls({ creds: pki.other }) : null, resumed: true });
  } finally {
    await src.stop();
    await dst.stop();
  }
  return line;
}
