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
import { loadClientTls } from '../nbd/client-tls.js';
import { answerRequest } from './control-socket.js';
import { DeviceSlots } from './device-slots.js';
import { checkTargetMembers, parseOp, type TargetMembers } from './migrate-control.js';

export interface ReplicateStartRequest extends TargetMembers {
  op: 'replicate-start' | 'replicate-once';
  everyMs?: number;
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
  const o = parseOp(line, MEMBERS);
  if (o.op === 'replicate-stop' && o.drop !== undefined && typeof o.drop !== 'boolean') throw invalid('member "drop" must be true or false');
  if (o.op !== 'replicate-start' && o.op !== 'replicate-once') return o as ReplicateRequest;
  checkTargetMembers(o);
  if (o.op === 'replicate-start' && (typeof o.everyMs !== 'number' || !Number.isSafeInteger(o.everyMs) || o.everyMs < MIN_EVERY_MS || o.everyMs > MAX_EVERY_MS)) {
    throw invalid(`member "everyMs" must be a whole number of ms from ${MIN_EVERY_MS} to ${MAX_EVERY_MS} (7 days)`);
  }
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

export class ReplicateRequests extends DeviceSlots<Replication> {
  /** Images with a `replicate-once` cycle running (not on a timer, but it holds the state meanwhile). */
  private readonly once = new Set<number>();

  /** A sentence naming the replication running on devices[index], or null. */
  blocking(index: number): string | null {
    if (this.once.has(index)) return `a replication cycle of ${this.devices[index]!.image} runs`;
    const r = this.slots[index];
    if (!r?.running) return null;
    const s = r.status();
    return `a replication of ${this.devices[index]!.image} to ${s.to} runs (started ${s.startedAt}); stop it first (kscinc replicate stop)`;
  }

  /** Answers `line` when its op is a replicate-* op (returns true); `migration` says why a migration forbids it, or null. */
  handle(sock: Socket, line: string, op: string | null, index: number, migration: string | null): boolean {
    if (!op?.startsWith('replicate-')) return false;
    answerRequest(sock, line, parseReplicateRequest, (req) => this.run(req, index, migration));
    return true;
  }

  private async run(req: ReplicateRequest, index: number, migration: string | null): Promise<ReplicateStatus> {
    const r = this.slots[index];
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
      this.slots[index] = rep;
      return rep.status();
    }
    if (!r) throw new KscError('KSC_E_NOT_FOUND', `no replication of ${image} since this server started`);
    if (req.op === 'replicate-status') return r.status();
    return r.stop(req.drop === true);
  }
}
