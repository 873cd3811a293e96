/**
 * The control socket of `kscinc serve`: lets `kscinc backup IMAGE` back up an image that a running server
 * holds open (and locked) by running the backup inside the server process, where the image's writes and
 * the backup's frozen view and bitmap handover meet. One unix socket per served image, at a path derived
 * from the image's real path, so the client finds it from the image name alone. Protocol: the client sends
 * one JSON line (a request); the server answers with JSON lines: {progress}… then {result} or {error}.
 */
import { createHash } from 'node:crypto';
import { realpathSync } from 'node:fs';
import { unlink } from 'node:fs/promises';
import { createConnection, createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { KscError, isKscError, type KscErrorCode } from '../errors.js';
import type { BlockDevice } from '../image/types.js';
import { openStore } from '../objstore/open.js';
import { Repository } from '../repo/repository.js';
import { backupDevice, type BackupResult, type BackupProgress } from '../engines/backup.js';

export interface BackupRequest {
  op: 'backup';
  repo: string;
  bitmap?: string | null;
  full?: boolean;
  tags?: string[];
  chunkSize?: number;
}

export function controlPath(image: string): string {
  let real: string;
  try {
    real = realpathSync(image);
  } catch {
    real = image;
  }
  return join(process.env.KSCINC_RUN_DIR ?? tmpdir(), `kscinc-${createHash('sha256').update(real).digest('hex').slice(0, 20)}.sock`);
}

/** Serves control requests for each device; returns a function that stops them. */
export async function startControl(devices: { image: string; device: BlockDevice }[], log: (line: string) => void): Promise<() => Promise<void>> {
  const servers: { server: Server; path: string }[] = [];
  for (const { image, device } of devices) {
    const path = controlPath(image);
    await unlink(path).catch(() => undefined); // a stale socket of a dead server (we hold the image lock)
    const server = createServer((sock) => {
      let buf = '';
      const send = (o: unknown): void => {
        if (!sock.destroyed) sock.write(JSON.stringify(o) + '\n');
      };
      sock.on('error', () => undefined);
      sock.on('data', (d) => {
        buf += d.toString('utf8');
        const nl = buf.indexOf('\n');
        if (nl < 0) {
          if (buf.length > 65536) sock.destroy();
          return;
        }
        sock.removeAllListeners('data');
        let req: BackupRequest;
        try {
          req = JSON.parse(buf.slice(0, nl)) as BackupRequest;
          if (req.op !== 'backup' || typeof req.repo !== 'string') throw new Error('unknown request');
        } catch (e) {
          send({ error: { code: 'KSC_E_INVALID', message: `bad control request: ${(e as Error).message}` } });
          sock.end();
          return;
        }
        log(`kscinc serve: backup of ${image} to ${req.repo} requested`);
        void (async () => {
          const store = await openStore(req.repo, { create: true });
          try {
            const repo = await Repository.openOrInit(store, { chunkSize: req.chunkSize });
            const result = await backupDevice(device, repo, { bitmap: req.bitmap, full: req.full, tags: req.tags, source: image, progress: (p) => send({ progress: p }) });
            log(`kscinc serve: backup ${result.id} of ${image} done`);
            send({ result });
          } finally {
            await store.close();
          }
        })().catch((e: unknown) => {
          log(`kscinc serve: backup of ${image} failed: ${(e as Error).message}`);
          send({ error: { code: isKscError(e) ? e.code : 'KSC_E_IO', message: (e as Error).message } });
        }).finally(() => sock.end());
      });
    });
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(path, () => resolve());
    });
    servers.push({ server, path });
  }
  return async () => {
    for (const { server, path } of servers) {
      await new Promise<void>((r) => server.close(() => r()));
      await unlink(path).catch(() => undefined);
    }
  };
}

/** Asks the server holding `image` to back it up; null when no server answers for it. */
export async function requestBackup(image: string, req: BackupRequest, onProgress?: (p: BackupProgress) => void): Promise<BackupResult | null> {
  const path = controlPath(image);
  return new Promise<BackupResult | null>((resolve, reject) => {
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
    sock.on('connect', () => sock.write(JSON.stringify(req) + '\n'));
    sock.on('data', (d) => {
      buf += d.toString('utf8');
      let nl: number;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const msg = JSON.parse(buf.slice(0, nl)) as { progress?: BackupProgress; result?: BackupResult; error?: { code: KscErrorCode; message: string } };
        buf = buf.slice(nl + 1);
        if (msg.progress) onProgress?.(msg.progress);
        if (msg.result) done(() => resolve(msg.result!));
        if (msg.error) done(() => reject(new KscError(msg.error!.code, msg.error!.message)));
      }
    });
    sock.on('close', () => done(() => reject(new KscError('KSC_E_IO', `the server holding ${image} closed the control connection before the backup finished`))));
  });
}
