/**
 * The control socket of `kscinc serve` (formats/control.md): lets `kscinc backup IMAGE` back up an image
 * that a running server holds open (and locked) by running the backup inside the server process, where the
 * image's writes and the backup's frozen view and bitmap handover meet. One unix socket per served image,
 * in a private folder (control-trust.ts), at a path derived from the image's real path, so the client finds
 * it from the image name alone. Protocol: the client sends one JSON line (a request); the server answers
 * with JSON lines: {progress}… then {result} or {error}. One operation per image at a time.
 */
import { createConnection, type Socket } from 'node:net';
import { KscError, isKscError, type KscErrorCode } from '../errors.js';
import type { BlockDevice } from '../image/types.js';
import { Repository } from '../repo/repository.js';
import { storeForBackup } from '../repo/open-at.js';
import { withOpenRepo } from '../repo/open-close.js';
import { backupDevice, type BackupResult, type BackupProgress } from '../engines/backup.js';
import { checkClientPath, controlPath, peerUid, trustedUid } from './control-trust.js';
import { failRequest, listenControl, requestOp, sendMessage } from './control-socket.js';
import { checkRequestKey, serverUnlock } from './control-key.js';
import { MigrateRequests } from './migrate-control.js';
import { ReplicateRequests } from './replicate-control.js';

export { controlPath } from './control-trust.js';

export interface BackupRequest {
  op: 'backup';
  repo: string;
  bitmap?: string | null;
  full?: boolean;
  tags?: string[];
  chunkSize?: number;
  /** An encrypted repository's master key, base64 (control-key.ts, formats/control.md §4). */
  key?: string;
}

function invalid(message: string): KscError {
  return new KscError('KSC_E_INVALID', `bad control request: ${message}`);
}

/** Decodes and checks one request line: every member's type, no unknown member (formats/control.md §2). */
export function parseRequest(line: string): BackupRequest {
  let v: unknown;
  try {
    v = JSON.parse(line);
  } catch (e) {
    throw invalid(`not JSON (${(e as Error).message})`);
  }
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw invalid('not a JSON object');
  const o = v as Record<string, unknown>;
  if (o.op !== 'backup') throw invalid(typeof o.op === 'string' ? `unknown op "${o.op.slice(0, 64)}"` : 'member "op" must be a string');
  for (const k of Object.keys(o)) {
    if (!['op', 'repo', 'bitmap', 'full', 'tags', 'chunkSize', 'key'].includes(k)) throw invalid(`unknown member "${k.slice(0, 64)}"`);
  }
  if (typeof o.repo !== 'string' || o.repo === '') throw invalid('member "repo" must be a non-empty string');
  if (o.bitmap !== undefined && o.bitmap !== null && (typeof o.bitmap !== 'string' || o.bitmap === '')) throw invalid('member "bitmap" must be a non-empty string or null');
  if (o.full !== undefined && typeof o.full !== 'boolean') throw invalid('member "full" must be true or false');
  if (o.tags !== undefined && (!Array.isArray(o.tags) || !o.tags.every((t) => typeof t === 'string'))) throw invalid('member "tags" must be an array of strings');
  if (o.chunkSize !== undefined && (typeof o.chunkSize !== 'number' || !Number.isSafeInteger(o.chunkSize) || o.chunkSize <= 0)) throw invalid('member "chunkSize" must be a positive whole number');
  checkRequestKey(o.key);
  return o as unknown as BackupRequest;
}

export interface ControlOptions {
  /** A connection that has not sent its whole request after this long is closed (default 10 s). */
  idleTimeoutMs?: number;
  /**
   * Answers requests for other operations (status, upgrade) before they are parsed as a backup; returns
   * false to leave the line to the backup parser.
   */
  other?: (sock: Socket, line: string, op: string | null, index: number) => boolean;
}

/** What runs on one image now; a second request is refused while it is set. */
interface Busy {
  op: string;
  repo: string;
  since: Date;
}

/** Runs the backup requests of control connections for each device (one at a time per image). */
export class BackupRequests {
  private readonly busy: (Busy | null)[];
  /** The migrate-* operations (formats/migrate.md §6). */
  private readonly migrations: MigrateRequests;
  /** The replicate-* operations (formats/control.md §7). */
  private readonly replications: ReplicateRequests;

  constructor(
    private devices: { image: string; device: BlockDevice }[],
    private readonly log: (line: string) => void,
  ) {
    this.busy = devices.map(() => null);
    this.migrations = new MigrateRequests(devices, log);
    this.replications = new ReplicateRequests(devices, log);
  }

  /** The devices to back up from now on (a worker that reopened its images). */
  setDevices(devices: { image: string; device: BlockDevice }[]): void {
    this.devices = devices;
    this.migrations.setDevices(devices);
    this.replications.setDevices(devices);
  }

  /** A sentence naming the operation running, or null when none runs. */
  running(): string | null {
    const migration = this.migrations.running() ?? this.replications.running();
    if (migration) return migration;
    for (let i = 0; i < this.busy.length; i++) {
      const b = this.busy[i];
      if (b) return `a ${b.op} of ${this.devices[i]!.image} is running (to ${b.repo}, started ${b.since.toISOString()})`;
    }
    return null;
  }

  /** Handles one request line read from the control socket of devices[index]. */
  handle(sock: Socket, line: string, index: number): void {
    const { image } = this.devices[index]!;
    const op = requestOp(line);
    if (this.replications.handle(sock, line, op, index, this.migrations.blocking(index))) return;
    const replicating = op === 'migrate-start' ? this.replications.blocking(index) : null;
    if (replicating) return failRequest(sock, 'KSC_E_LOCKED', `${replicating}: no migration meanwhile`);
    if (this.migrations.handle(sock, line, op, index, this.busy[index] !== null)) return;
    sock.on('error', () => undefined);
    let req: BackupRequest;
    try {
      req = parseRequest(line);
    } catch (e) {
      failRequest(sock, 'KSC_E_INVALID', (e as Error).message);
      return;
    }
    const busy = this.busy[index];
    const migration = this.migrations.blocking(index);
    if (migration) {
      failRequest(sock, 'KSC_E_LOCKED', `${migration}: no backup meanwhile`);
      return;
    }
    if (busy) {
      failRequest(sock, 'KSC_E_LOCKED', `a ${busy.op} of ${image} is running (to ${busy.repo}, started ${busy.since.toISOString()}); try again when it has finished`);
      return;
    }
    this.busy[index] = { op: req.op, repo: req.repo, since: new Date() };
    const { device } = this.devices[index]!;
    this.log(`kscinc serve: backup of ${image} to ${req.repo} requested`);
    void runBackup(image, device, req, (p) => sendMessage(sock, { progress: p }))
      .then(
        (result) => {
          this.log(`kscinc serve: backup ${result.id} of ${image} done`);
          sendMessage(sock, { result });
        },
        (e: unknown) => {
          this.log(`kscinc serve: backup of ${image} failed: ${(e as Error).message}`);
          sendMessage(sock, { error: { code: isKscError(e) ? e.code : 'KSC_E_IO', message: (e as Error).message } });
        },
      )
      .finally(() => {
        this.busy[index] = null;
        sock.end();
      });
  }
}

/**
 * Serves control requests for each device; returns a function that stops them. Throws KSC_E_PERMISSION
 * when the run folder is not private or a socket path belongs to someone else: `serve` must not go on
 * without owning its sockets.
 */
export async function startControl(devices: { image: string; device: BlockDevice }[], log: (line: string) => void, opts: ControlOptions = {}): Promise<() => Promise<void>> {
  const backups = new BackupRequests(devices, log);
  return listenControl(
    devices.map((d) => d.image),
    (sock, line, index) => {
      if (opts.other?.(sock, line, requestOp(line), index)) return;
      backups.handle(sock, line, index);
    },
    log,
    opts,
  );
}

async function runBackup(image: string, device: BlockDevice, req: BackupRequest, progress: (p: BackupProgress) => void): Promise<BackupResult> {
  // The client created a missing repository already (new-repo.ts); one still missing gets the default (§13.0).
  const { store, encrypt } = await storeForBackup(req.repo, undefined);
  return withOpenRepo(
    store,
    (st) => Repository.openOrInit(st, { chunkSize: req.chunkSize, unlock: serverUnlock(req.key), encrypt }),
    (repo) => backupDevice(device, repo, { bitmap: req.bitmap, full: req.full, tags: req.tags, source: image, progress }),
  );
}

/**
 * Asks the server holding `image` to back it up; null when no server answers for it. KSC_E_PERMISSION when
 * the socket's folder or file belongs to another user or the peer runs as another user: never trust it.
 */
export function requestBackup(image: string, req: BackupRequest, onProgress?: (p: BackupProgress) => void): Promise<BackupResult | null> {
  return controlRequest<BackupResult, BackupProgress>(image, req, 'the backup finished', onProgress);
}

/**
 * Sends one request to the server holding `image` and resolves with its `result` (rejects with its `error`
 * as a KscError); null when no server answers for it. `what` ends the message of an early close.
 */
export async function controlRequest<R, P = unknown>(image: string, req: object, what: string, onProgress?: (p: P) => void): Promise<R | null> {
  const path = controlPath(image);
  if (!(await checkClientPath(path))) return null;
  return new Promise<R | null>((resolve, reject) => {
    const sock = createConnection(path);
    let buf = '';
    let settled = false;
    const done = (f: () => void): void => {
      if (!settled) {
        settled = true;
        f();
      }
    };
    sock.on('error', (e: NodeJS.ErrnoException) => done(() => (e.code === 'ENOENT' || e.code === 'ECONNREFUSED' ? resolve(null) : reject(e))));
    sock.on('connect', () => {
      const uid = peerUid(sock);
      if (uid !== null && !trustedUid(uid)) {
        sock.destroy();
        done(() => reject(new KscError('KSC_E_PERMISSION', `the control socket ${path} is served by uid ${uid}, not by us (uid ${process.getuid?.()}): refusing to talk to it`)));
        return;
      }
      sock.write(JSON.stringify(req) + '\n');
    });
    sock.on('data', (d) => {
      buf += d.toString('utf8');
      let nl: number;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        let msg: { progress?: P; result?: R; error?: { code: KscErrorCode; message: string } };
        try {
          msg = JSON.parse(line) as typeof msg;
        } catch {
          sock.destroy();
          done(() => reject(new KscError('KSC_E_IO', `the server holding ${image} sent a line that is not JSON on ${path}`)));
          return;
        }
        if (msg.progress) onProgress?.(msg.progress);
        if (msg.result) done(() => resolve(msg.result!));
        if (msg.error) done(() => reject(new KscError(msg.error!.code, msg.error!.message)));
      }
    });
    sock.on('close', () => done(() => reject(new KscError('KSC_E_IO', `the server holding ${image} closed the control connection before ${what}`))));
  });
}
