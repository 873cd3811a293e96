/**
 * Kill points of a migration, for the every-step kill tests (test/migrate/kill.test.ts, formats/migrate.md
 * §4.1 and §8): with KSCINC_TEST_KILL_AT=migrate@PHASE in the environment of the source `kscinc serve`, the
 * process running the migration SIGKILLs itself when it reaches PHASE, once. `migrate@copied-BYTES` fires
 * at the first point where at least BYTES payload bytes were acknowledged by the destination. The phases
 * are named where the engine calls migrateKillPoint (src/engines/migrate*.ts). With KSCINC_TEST_KILL_PEER=PID
 * as well, the kill point SIGKILLs process PID (the destination's `kscinc serve --incoming`) instead and
 * the migration goes on (test/hostile/s23r-migrate-dst-steps.ts). Without the variable nothing
 * happens. (The hot upgrade's kill points live in src/supervisor/killpoint.ts.)
 */
import { writeSync } from 'node:fs';

const spec = /^migrate@([a-z0-9-]+)$/.exec(process.env.KSCINC_TEST_KILL_AT ?? '')?.[1] ?? null;
const copied = spec && /^copied-(\d+)$/.exec(spec);
const copiedAt = copied ? Number(copied[1]) : null;
/** KSCINC_TEST_KILL_PEER=PID: the kill point SIGKILLs that process (the destination) instead, once, and this one goes on. */
const peer = /^[1-9]\d*$/.test(process.env.KSCINC_TEST_KILL_PEER ?? '') ? Number(process.env.KSCINC_TEST_KILL_PEER) : null;
let peerKilled = false;

function die(what: string): void {
  if (peer !== null) {
    if (peerKilled) return;
    peerKilled = true;
    writeSync(2, `kscinc: test kill point migrate@${what}: SIGKILL peer pid ${peer}\n`);
    process.kill(peer, 'SIGKILL');
    return;
  }
  writeSync(2, `kscinc: test kill point migrate@${what}: SIGKILL self (pid ${process.pid})\n`);
  process.kill(process.pid, 'SIGKILL');
}

/** Kills this process at `phase` when the environment asks for it. */
export function migrateKillPoint(phase: string): void {
  if (spec === phase) die(phase);
}

/** Kills this process once `bytes` acknowledged bytes reach the `copied-N` kill point. */
export function migrateKillPointBytes(bytes: number): void {
  if (copiedAt !== null && bytes >= copiedAt) die(`copied-${copiedAt}`);
}
