/**
 * The replicate operations of the control socket (formats/control.md §7, formats/migrate.md §11), run in the
 * serving process next to the backups and migrations: one replication per image, its timer and counters here,
 * its state in the image. control.ts hands it every line whose op starts with `replicate-`, and asks it
 * whether a replication runs (a migration start and an upgrade are refused meanwhile).
 */
import type { Socket } from 'node:net';
import { KscError } from '../errors.js';
import type { BlockDevice } from '../image/types.js';
import { baseFingerprint } from '../engines/migrate-base.js';
import { randomBytes } from 'node:crypto';
import { MAX_EVERY_MS, MIN_EVERY_MS, Replication, type ReplicaTarget, type ReplicateStatus } from '../engines/replicate.js';
import { NbdTarget } from '../nbd/migrate-target.js';
import { checkTlsFiles, loadClientTls, type TlsClientFiles } from '../nbd/client-tls.js';
import { answerRequest } from './control-socket.js';

export interface ReplicateStartRequest {
  op: 'replicate-start' | 'replicate-once';
  to: string;
  everyMs?: number;
  token?: string;
  baseFingerprint?: string;
  bandwidth?: number;
  connections?: number;
  /** false: never lz4-compressed writes (formats/migrate.md §12). */
  compress?: boolean;
  tls?: TlsClientFiles;
}

export type ReplicateRequest = { op: string; drop?: boolean } & Partial<Omit<ReplicateStartRequest, 'op'>>;

const invalid = (message: string): KscError => new KscError('KSC_E_INVALID', `bad control request: ${message}`);

const TARGET_MEMBERS = ['op', 'to', 'token', 'baseFingerprint', 'bandwidth', 'connections', 'compress', 'tls'];
const MEMBERS: Record<string, string[]> = {
  'replicate-start': [...TARGET_MEMBERS, 'everyMs'],
  'replicate-once': TARGET_MEMBERS,
  'replicate-status': ['op'],
  'replicate-stop': ['op', 'drop'],
};

/** Decodes and checks a replicate-* request line (formats/control.md §7). */
export function parseReplicateRequest(line: string): ReplicateRequest {
  const o = JSON.parse(line) as Record<string, unknown>;
  const allowed = MEMBERS[o.op as string];
  if (!allowed) throw invalid(`unknown op "${String(o.op).slice(0, 64)}"`);
  for (const k of Object.keys(o)) if (!allowed.includes(k)) throw invalid(`unknown member "${k.slice(0, 64)}"`);
  if (o.op === 'replicate-stop' && o.drop !== undefined && typeof o.drop !== 'boolean') throw invalid('member "drop" must be true or false');
  if (o.op !== 'replicate-start' && o.op !== 'replicate-once') return o as ReplicateRequest;
  if (typeof o.to !== 'string' || o.to === '') throw invalid('member "to" must be a non-empty string');
  if (o.op === 'replicate-start' && (typeof o.everyMs !== 'number' || !Number.isSafeInteger(o.everyMs) || o.everyMs < MIN_EVERY_MS || o.everyMs > MAX_EVERY_MS)) {
    throw invalid(`member "everyMs" must be a whole number of ms from ${MIN_EVERY_MS} to ${MAX_EVERY_MS} (7 days)`);
  }
  if (o.token !== undefined && (typeof o.token !== 'string' || !/^[0-9a-f]{32}$/.test(o.token))) throw invalid('member "token" must be 32 lowercase hex digits');
  if (o.baseFingerprint !== undefined && (typeof o.baseFingerprint !== 'string' || !/^(none|v1:\d+:[0-9a-f]{64})$/.test(o.baseFingerprint))) {
    throw invalid('member "baseFingerprint" must be "none" or "v1:SIZE:HEX" (kscinc migrate fingerprint prints it)');
  }
  if (o.bandwidth !== undefined && (typeof o.bandwidth !== 'number' || !Number.isSafeInteger(o.bandwidth) || o.bandwidth < 4096))
    throw invalid('member "bandwidth" must be a whole number of bytes/s ≥ 4096');
  if (o.compress !== undefined && typeof o.compress !== 'boolean') throw invalid('member "compress" must be true or false');
  if (o.connections !== undefined && (typeof o.connections !== 'number' || !Number.isInteger(o.connections) || o.connections < 1 || o.connections > 16)) {
    throw invalid('member "connections" must be a whole number from 1 to 16');
  }
  if (o.tls !== undefined) checkTlsFiles(o.tls);
  return o as unknown as ReplicateRequest;
}

/**
 * Connects to the replica for each cycle (formats/migrate.md §11.2): the sizes must be equal and the bases
 * the same (the source's fingerprint computed once, at the first connect; the destination's told by
 * `baseFingerprint` or learnt from a kscinc destination at every connect).
 */
export function replicaConnector(device: BlockDevice, image: string, req: ReplicateStartRequest): () => Promise<ReplicaTarget> {
  let ours: Promise<string> | null = null;
  return async () => {
    const target = await NbdTarget.connect({
      uri: req.to,
      token: req.token,
      connections: req.connections,
      compress: req.compress,
      tls: loadClientTls(req.tls),
      cycle: randomBytes(16).toString('hex'),
    });
    try {
      if (target.size !== device.size) throw new KscError('KSC_E_INVALID', `${req.to} is ${target.size} bytes, ${image} is ${device.size}: the sizes must be equal`);
      if (target.origin) throw new KscError('KSC_E_INVALID', `${req.to} is a restore of a backup (a seeded destination): replication to it is not offered; use a fresh overlay on the same base`);
      const theirs = req.baseFingerprint ?? target.baseFingerprint;
      if (!theirs) {
        throw new KscError(
          'KSC_E_INVALID',
          `cannot learn the base fingerprint of ${req.to} (not a kscinc --incoming export): run \`kscinc migrate fingerprint BASE\` on the destination and pass --base-fingerprint`,
        );
      }
      ours ??= baseFingerprint(device);
      const mine = await ours.catch((e: unknown) => {
        ours = null;
        throw e;
      });
      if (mine !== theirs) throw new KscError('KSC_E_INVALID', `the base of ${image} (fingerprint ${mine}) is not the destination's (${theirs}): refusing to replicate only the layers above it`);
      return target;
    } catch (e) {
      target.destroy();
      throw e;
    }
  };
}

export class ReplicateRequests {
  private readonly replications: (Replication | null)[];
  /** Images with a `replicate-once` cycle running (not on a timer, but it holds the state meanwhile). */
  private readonly once = new Set<number>();

  constructor(
    private devices: { image: string; device: BlockDevice }[],
    private readonly log: (line: string) => void,
  ) {
    this.replications = devices.map(() => null);
  }

  setDevices(devices: { image: string; device: BlockDevice }[]): void {
    this.devices = devices;
  }

  /** A sentence naming the replication running on devices[index], or null. */
  blocking(index: number): string | null {
    if (this.once.has(index)) return `a replication cycle of ${this.devices[index]!.image} runs`;
    const r = this.replications[index];
    if (!r?.running) return null;
    const s = r.status();
    return `a replication of ${this.devices[index]!.image} to ${s.to} runs (started ${s.startedAt}); stop it first (kscinc replicate stop)`;
  }

  /** A sentence naming a replication that forbids an upgrade now, or null. */
  running(): string | null {
    for (let i = 0; i < this.replications.length; i++) {
      const b = this.blocking(i);
      if (b) return b;
    }
    return null;
  }

  /** Answers `line` when its op is a replicate-* op (returns true); `migration` says why a migration forbids it, or null. */
  handle(sock: Socket, line: string, op: string | null, index: number, migration: string | null): boolean {
    if (!op?.startsWith('replicate-')) return false;
    answerRequest(sock, line, parseReplicateRequest, (req) => this.run(req, index, migration));
    return true;
  }

  private async run(req: ReplicateRequest, index: number, migration: string | null): Promise<ReplicateStatus> {
    const r = this.replications[index];
    const { image, device } = this.devices[index]!;
    if (req.op === 'replicate-start' || req.op === 'replicate-once') {
      if (migration) throw new KscError(migration.includes('was migrated') ? 'KSC_E_INVALID' : 'KSC_E_LOCKED', `${migration}: no replication meanwhile`);
      const busy = this.blocking(index);
      if (busy) throw new KscError('KSC_E_LOCKED', busy);
      const start = req as ReplicateStartRequest;
      const opts = { to: start.to, bandwidth: start.bandwidth, connect: replicaConnector(device, image, start), log: this.log };
      this.log(`kscinc serve: replication of ${image} to ${start.to} requested${start.everyMs ? ` every ${start.everyMs} ms` : ' (one cycle)'}`);
      if (req.op === 'replicate-once') {
        this.once.add(index);
        return Replication.once(device, opts).finally(() => this.once.delete(index));
      }
      this.once.add(index); // refuses a second start while the first one connects
      const rep = await Replication.start(device, { ...opts, everyMs: start.everyMs! }).finally(() => this.once.delete(index));
      this.replications[index] = rep;
      return rep.status();
    }
    if (!r) throw new KscError('KSC_E_NOT_FOUND', `no replication of ${image} since this server started`);
    if (req.op === 'replicate-status') return r.status();
    return r.stop(req.drop === true);
  }
}
