/**
 * The fields of a schedule's `replicate:` job (formats/schedule.md §1.1, formats/migrate.md §11): the
 * destination URI and the target options of `kscinc replicate once`, as keys named like its flags
 * (`tls-creds:` is `--tls-creds`). Checked here with errors naming the file, the job and the key; the CLI
 * turns them into the request with the one builder of migrate start's (src/cli/migrate-request.ts), which
 * also loads the TLS files.
 */
import { isAbsolute, resolve } from 'node:path';
import { KscError } from '../../errors.js';
import { parseSize } from '../../util/size.js';

/** A replication job's target options, named as the builder's (the CLI's camelCase option names). */
export interface ReplicaTarget {
  /** The destination's incoming token (`kscinc serve --incoming` printed it). */
  token?: string;
  /** The destination base's fingerprint (`kscinc migrate fingerprint BASE`), for a destination that is not kscinc. */
  baseFingerprint?: string;
  /** As written (K/M/G), at least 4096 bytes/s. */
  bandwidth?: string;
  connections?: number;
  /** false: never lz4-compressed writes. */
  compress?: false;
  /** A QEMU tls-creds-x509 client folder (ca-cert.pem, client-cert.pem, client-key.pem), absolute. */
  tlsCreds?: string;
  /** QEMU's keys.psk, absolute. */
  tlsPsk?: string;
  tlsPskUser?: string;
}

/** YAML key → the option it sets. */
const KEYS = {
  token: 'token',
  'base-fingerprint': 'baseFingerprint',
  bandwidth: 'bandwidth',
  connections: 'connections',
  compress: 'compress',
  'tls-creds': 'tlsCreds',
  'tls-psk': 'tlsPsk',
  'tls-psk-user': 'tlsPskUser',
} as const satisfies Record<string, keyof ReplicaTarget>;

/** The job keys of a replication's target (besides `replicate:` itself). */
export const TARGET_KEYS: readonly string[] = Object.keys(KEYS);

/** Fields of a backup job that a replication job does not take. */
const BACKUP_ONLY = ['repo', 'bitmap', 'keep', 'tags', 'encrypt'];

type Obj = Record<string, unknown>;

const describe = (v: unknown): string => (v === null ? 'null' : Array.isArray(v) ? 'a list' : typeof v === 'string' ? `"${v}"` : typeof v === 'object' ? 'a mapping' : String(v));
const invalid = (where: string, msg: string): KscError => new KscError('KSC_E_INVALID', `${where}: ${msg}`);

function text(v: unknown, where: string, key: string): string {
  if (typeof v !== 'string' || v.trim() === '') throw invalid(where, `${key} must be a non-empty string, not ${describe(v)}`);
  return v.trim();
}

/** One key's value, checked (paths resolved against `base`, the schedule file's folder). */
/** undefined: the default (compress: true). */
function option(key: keyof typeof KEYS, v: unknown, where: string, base: string): string | number | false | undefined {
  switch (key) {
    case 'token':
      if (typeof v !== 'string' || !/^[0-9a-f]{32}$/.test(v)) throw invalid(where, `token must be the 32 lowercase hex digits the destination's incoming server printed, not ${describe(v)}`);
      return v;
    case 'base-fingerprint':
      if (typeof v !== 'string' || !/^(none|v1:\d+:[0-9a-f]{64})$/.test(v)) {
        throw invalid(where, `base-fingerprint must be "none" or what \`kscinc migrate fingerprint BASE\` printed on the destination (v1:SIZE:HEX), not ${describe(v)}`);
      }
      return v;
    case 'bandwidth': {
      const s = typeof v === 'number' ? String(v) : text(v, where, key);
      let n: number;
      try {
        n = parseSize(s, 'bandwidth');
      } catch (e) {
        throw invalid(where, (e as Error).message);
      }
      if (n < 4096) throw invalid(where, `bandwidth "${s}": at least 4096 bytes per second (4K)`);
      return s;
    }
    case 'connections':
      if (typeof v !== 'number' || !Number.isInteger(v) || v < 1 || v > 16) throw invalid(where, `connections must be a whole number from 1 to 16, not ${describe(v)}`);
      return v;
    case 'compress':
      if (typeof v !== 'boolean') throw invalid(where, `compress must be true or false (false: never lz4-compressed writes), not ${describe(v)}`);
      return v ? undefined : false;
    case 'tls-psk-user':
      return text(v, where, key);
    default: {
      const p = text(v, where, key);
      return isAbsolute(p) ? p : resolve(base, p);
    }
  }
}

/** TLS: X.509 or PSK, not both; an identity only with PSK; nbds:// only with one of them. */
function checkTls(t: ReplicaTarget, to: string, where: string): void {
  if (t.tlsCreds !== undefined && t.tlsPsk !== undefined) throw invalid(where, 'tls-creds and tls-psk are exclusive: choose X.509 or PSK');
  if (t.tlsPskUser !== undefined && t.tlsPsk === undefined) throw invalid(where, 'tls-psk-user goes with tls-psk');
  if (/^nbds/i.test(to) && t.tlsCreds === undefined && t.tlsPsk === undefined) {
    throw invalid(where, `replicate "${to}": nbds:// means TLS: give tls-creds (a folder with ca-cert.pem, client-cert.pem, client-key.pem) or tls-psk (a keys.psk file)`);
  }
}

/** The `replicate:` job's destination and target options, or null for a backup job (whose target keys are refused). */
export function parseReplicate(v: Obj, where: string, base: string): { to: string; target: ReplicaTarget } | null {
  if (v.replicate === undefined) {
    const stray = TARGET_KEYS.find((k) => v[k] !== undefined);
    if (stray) throw invalid(where, `${stray} belongs to a replicate job (replicate: nbd://HOST:PORT/EXPORT)`);
    return null;
  }
  const to = text(v.replicate, where, 'replicate');
  if (!/^nbds?(\+unix)?:\/\//i.test(to)) throw invalid(where, `replicate "${to}": expected an NBD URI, nbd[s]://HOST:PORT/EXPORT or nbd[s]+unix:///EXPORT?socket=PATH`);
  const bad = BACKUP_ONLY.find((k) => v[k] !== undefined);
  if (bad) throw invalid(where, `a replicate job takes no "${bad}" (it copies the disk to ${to}, it makes no backup)`);
  const target: Record<string, unknown> = {};
  for (const [key, name] of Object.entries(KEYS)) {
    if (v[key] === undefined) continue;
    const value = option(key as keyof typeof KEYS, v[key], where, base);
    if (value !== undefined) target[name] = value;
  }
  checkTls(target as ReplicaTarget, to, where);
  return { to, target: target as ReplicaTarget };
}
