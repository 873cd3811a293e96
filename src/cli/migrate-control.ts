/**
 * The migrate operations of the control socket (formats/migrate.md §6), run in the serving process next to
 * the backups (control.ts hands it every line whose op starts with `migrate-`). One migration per image; its
 * state lives here, so while one is active — and after one completed, since the source then refuses writes
 * only as long as this process lives — the worker refuses a hot upgrade (running()).
 */
import type { Socket } from 'node:net';
import { KscError } from '../errors.js';
import type { BlockDevice } from '../image/types.js';
import { baseFingerprint } from '../engines/migrate-base.js';
import { Migration } from '../engines/migrate.js';
import { NbdTarget } from '../nbd/migrate-target.js';
import { checkTlsFiles, loadClientTls, type TlsClientFiles } from '../nbd/client-tls.js';
import { answerRequest } from './control-socket.js';
import { DeviceSlots } from './device-slots.js';
import { checkRequestKey, serverUnlock } from './control-key.js';
import { parseOriginContext } from '../engines/migrate-origin.js';
import { prepareSeed, type Seed } from '../engines/migrate-seed.js';

/** The destination of a migration or a replication (replicate-control.ts), and how it is written. */
export interface TargetMembers {
  to: string;
  token?: string;
  baseFingerprint?: string;
  bandwidth?: number;
  connections?: number;
  /** false: never ask a kscinc destination for compressed writes (formats/migrate.md §12). */
  compress?: boolean;
  /** TLS credentials' files (formats/nbd.md §5), loaded by the server. */
  tls?: TlsClientFiles;
}

export interface MigrateStartRequest extends TargetMembers {
  op: 'migrate-start';
  /** A seeded destination's repository (formats/migrate.md §9), and its master key (control.md §4). */
  repo?: string;
  key?: string;
}

/** Any migrate-* request; the members other than op only in migrate-start. */
export type MigrateRequest = { op: string } & Partial<Omit<MigrateStartRequest, 'op'>>;

function invalid(message: string): KscError {
  return new KscError('KSC_E_INVALID', `bad control request: ${message}`);
}

const MEMBERS: Record<string, string[]> = {
  'migrate-start': ['op', 'to', 'token', 'baseFingerprint', 'bandwidth', 'connections', 'compress', 'tls', 'repo', 'key'],
  'migrate-status': ['op'],
  'migrate-complete': ['op'],
  'migrate-cancel': ['op'],
};

/** A control request line as an object whose op is one of `members`' keys and whose members are that op's (else KSC_E_INVALID). */
export function parseOp(line: string, members: Record<string, string[]>): Record<string, unknown> {
  const o = JSON.parse(line) as Record<string, unknown>;
  const allowed = members[o.op as string];
  if (!allowed) throw invalid(`unknown op "${String(o.op).slice(0, 64)}"`);
  for (const k of Object.keys(o)) if (!allowed.includes(k)) throw invalid(`unknown member "${k.slice(0, 64)}"`);
  return o;
}

/** The members naming a destination, shared by migrate-start and replicate-start/once (formats/control.md §7). */
export function checkTargetMembers(o: Record<string, unknown>): void {
  if (typeof o.to !== 'string' || o.to === '') throw invalid('member "to" must be a non-empty string');
  if (o.token !== undefined && (typeof o.token !== 'string' || !/^[0-9a-f]{32}$/.test(o.token))) throw invalid('member "token" must be 32 lowercase hex digits');
  if (o.baseFingerprint !== undefined && (typeof o.baseFingerprint !== 'string' || !/^(none|v1:\d+:[0-9a-f]{64})$/.test(o.baseFingerprint))) {
    throw invalid('member "baseFingerprint" must be "none" or "v1:SIZE:HEX" (kscinc migrate fingerprint prints it)');
  }
  if (o.bandwidth !== undefined && (typeof o.bandwidth !== 'number' || !Number.isSafeInteger(o.bandwidth) || o.bandwidth < 4096))
    throw invalid('member "bandwidth" must be a whole number of bytes/s ≥ 4096');
  if (o.connections !== undefined && (typeof o.connections !== 'number' || !Number.isInteger(o.connections) || o.connections < 1 || o.connections > 16)) {
    throw invalid('member "connections" must be a whole number from 1 to 16');
  }
  if (o.compress !== undefined && typeof o.compress !== 'boolean') throw invalid('member "compress" must be true or false');
  if (o.tls !== undefined) checkTlsFiles(o.tls);
}

/** Decodes and checks a migrate-* request line (formats/migrate.md §6). */
export function parseMigrateRequest(line: string): MigrateRequest {
  const o = parseOp(line, MEMBERS);
  if (o.op !== 'migrate-start') return o as MigrateRequest;
  checkTargetMembers(o);
  if (o.repo !== undefined && (typeof o.repo !== 'string' || o.repo === '')) throw invalid('member "repo" must be a non-empty string');
  checkRequestKey(o.key);
  return o as unknown as MigrateRequest;
}

export class MigrateRequests extends DeviceSlots<Migration> {
  /** Why the image may not be backed up or handed over now, or null. */
  blocking(index: number): string | null {
    const m = this.slots[index];
    if (!m || !(m.active || m.phase === 'completed')) return null;
    const s = m.status();
    return m.phase === 'completed'
      ? `${this.devices[index]!.image} was migrated to ${s.to}; stop this server`
      : `a migration of ${this.devices[index]!.image} to ${s.to} is ${s.phase} (started ${s.startedAt})`;
  }

  /**
   * Answers `line` when its op is a migrate-* op (returns true); `backupBusy` says whether a backup of the
   * image runs. Returns false for any other op.
   */
  handle(sock: Socket, line: string, op: string | null, index: number, backupBusy: boolean): boolean {
    if (!op?.startsWith('migrate-')) return false;
    answerRequest(sock, line, parseMigrateRequest, (req) => this.run(req, index, backupBusy));
    return true;
  }

  private async run(req: MigrateRequest, index: number, backupBusy: boolean): Promise<unknown> {
    const m = this.slots[index];
    const { image } = this.devices[index]!;
    if (req.op === 'migrate-start') {
      if (backupBusy) throw new KscError('KSC_E_LOCKED', `a backup of ${image} is running; start the migration when it has finished`);
      if (m?.active) throw new KscError('KSC_E_LOCKED', this.blocking(index)!);
      if (m?.phase === 'completed') throw new KscError('KSC_E_INVALID', this.blocking(index)!);
      return this.start(req as MigrateStartRequest, index);
    }
    if (!m) throw new KscError('KSC_E_NOT_FOUND', `no migration of ${image} since this server started`);
    if (req.op === 'migrate-status') return m.status();
    if (req.op === 'migrate-cancel') return m.cancel();
    return m.complete();
  }

  private async start(req: MigrateStartRequest, index: number): Promise<unknown> {
    const { image, device } = this.devices[index]!;
    this.log(`kscinc serve: migration of ${image} to ${req.to} requested`);
    const target = await NbdTarget.connect({ uri: req.to, token: req.token, connections: req.connections, compress: req.compress, tls: loadClientTls(req.tls) });
    let seed: Seed | null = null;
    try {
      seed = target.origin ? await prepareSeed(device, parseOriginContext(target.origin, req.to), { repo: req.repo, unlock: serverUnlock(req.key), to: req.to }) : null;
      if (seed) return await this.begin(index, device, target, req, seed); // formats/migrate.md §9: no base check
      const theirs = req.baseFingerprint ?? target.baseFingerprint;
      if (!theirs) {
        throw new KscError(
          'KSC_E_INVALID',
          `cannot learn the base fingerprint of ${req.to} (not a kscinc --incoming export): run \`kscinc migrate fingerprint BASE\` on the destination and pass --base-fingerprint`,
        );
      }
      const ours = await baseFingerprint(device);
      if (ours !== theirs) throw new KscError('KSC_E_INVALID', `the base of ${image} (fingerprint ${ours}) is not the destination's (${theirs}): refusing to migrate only the layers above it`);
      const m = await Migration.start(device, target, { to: req.to, bandwidth: req.bandwidth, log: this.log });
      this.slots[index] = m;
      return m.status();
    } catch (e) {
      await seed?.close();
      target.destroy();
      throw e;
    }
  }

  /** Starts a seeded migration (formats/migrate.md §9): its first pass is what differs from the destination's backup. */
  private async begin(index: number, device: BlockDevice, target: NbdTarget, req: MigrateStartRequest, seed: Seed): Promise<unknown> {
    this.log(`kscinc serve: ${req.to} holds backup ${seed.info.backup}: first pass from ${seed.info.via === 'bitmap' ? `bitmap ${seed.info.bitmap}` : 'chunk hashes against its manifest'}`);
    const m = await Migration.start(device, target, { to: req.to, bandwidth: req.bandwidth, log: this.log, seed: { firstPass: () => seed.plan(), info: seed.info } });
    this.slots[index] = m;
    return m.status();
  }
}
