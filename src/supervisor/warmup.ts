/**
 * Warm-up of a new worker before a hot upgrade's pause (issue 16): a fresh Node process compiles each
 * function the first time it runs, and the first open of an image and the first requests of an adopted
 * connection took tens of milliseconds more than later ones (bench/README "Upgrade pause"). While the old
 * worker still serves, the new one runs the same paths once on a small throwaway image with a bitmap in a
 * private temporary folder: create, open, an NBD connection adopted with a negotiated state (simple and
 * structured replies), writes, reads, a flush, close. It touches nothing of the served images. Its folder
 * is named after the process (kscinc-warmup-PID-*): a later warm-up removes those of processes gone. The
 * folder is in /dev/shm when that is a writable folder (memory; KSCINC_WARMUP_DIR overrides it), else in
 * the temporary folder: on the served images' file system the warm-up's syncs (create, flush, close) went
 * through the same journal as the serving worker's, and its requests waited for them.
 */
import { accessSync, constants, statSync } from 'node:fs';
import { mkdtemp, readdir, rm } from 'node:fs/promises';
import * as net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { bitmapsOf } from '../image/capabilities.js';
import { createImage, openImage } from '../image/open.js';
import { closeDevices, openExports } from '../cli/serve-open.js';
import { NbdServer } from '../nbd/server.js';
import { transmissionFlagsOf, SESSION_STATE_VERSION } from '../nbd/state.js';
import { CLIENT_FLAG_FIXED_NEWSTYLE, CLIENT_FLAG_NO_ZEROES, CMD, SIMPLE_REPLY_MAGIC, encodeRequest } from '../nbd/wire.js';

const SIZE = 64 * 1024 * 1024;
const PREFIX = 'kscinc-warmup-';

/** Where the warm-up makes its folder: KSCINC_WARMUP_DIR, else /dev/shm when writable, else the temporary folder. */
export function warmupRoot(): string {
  const forced = process.env.KSCINC_WARMUP_DIR;
  if (forced) return forced;
  try {
    if (!statSync(SHM).isDirectory()) return tmpdir();
    accessSync(SHM, constants.W_OK | constants.X_OK);
    return SHM;
  } catch {
    return tmpdir();
  }
}
const SHM = '/dev/shm';

/** Folders of warm-ups whose process is gone (a worker killed while warming up); errors are ignored. */
async function removeStale(root: string): Promise<void> {
  const names = await readdir(root).catch(() => [] as string[]);
  for (const n of names) {
    const m = /^kscinc-warmup-(\d+)-/.exec(n);
    if (!m || alive(Number(m[1]))) continue;
    await rm(join(root, n), { recursive: true, force: true }).catch(() => undefined);
  }
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}
const IO = 4096;

/** Runs the warm-up; resolves when done (errors are the caller's to ignore: a cold worker still works). */
export async function warmUp(): Promise<void> {
  const root = warmupRoot();
  await removeStale(root);
  const dir = await mkdtemp(join(root, `${PREFIX}${process.pid}-`));
  try {
    const file = join(dir, 'w.ksc');
    await createImage(file, { size: SIZE });
    const dev = await openImage(file, { write: true });
    try {
      await bitmapsOf(dev)?.addBitmap('w');
    } finally {
      await dev.close();
    }
    const opened = await openExports({ images: [file], names: ['w'], readOnly: false, bitmap: ['w'] });
    try {
      const server = new NbdServer({ exports: opened.exports });
      try {
        for (const structured of [false, true]) await session(server, opened.exports.get('w')!, join(dir, `s${structured ? 1 : 0}`), structured);
      } finally {
        await server.close();
      }
    } finally {
      await closeDevices(opened.devices);
    }
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/** One adopted connection over a unix socket: 16 writes and 16 reads at queue depth 8, a flush, disconnect. */
async function session(server: NbdServer, exp: Parameters<typeof transmissionFlagsOf>[0], path: string, structured: boolean): Promise<void> {
  const listener = net.createServer();
  await new Promise<void>((resolve, reject) => {
    listener.once('error', reject);
    listener.listen(path, () => resolve());
  });
  try {
    const accepted = new Promise<net.Socket>((resolve) => listener.once('connection', resolve));
    const client = net.connect(path);
    client.on('error', () => undefined);
    const sock = await accepted;
    listener.close(); // accepts no more; the connection itself ends with the session
    const clientFlags = CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES;
    const state = {
      v: SESSION_STATE_VERSION,
      exportName: 'w',
      exportSize: exp.device.size,
      transmissionFlags: transmissionFlagsOf(exp, structured),
      clientFlags,
      noZeroes: true,
      structuredReplies: structured,
      metaContexts: [],
    };
    server.adopt(sock, { state: state as never, pending: Buffer.alloc(0) });
    const reqs: Buffer[] = [];
    let cookie = 1n;
    for (let i = 0; i < 16; i++) {
      const offset = ((i * 7919) % (SIZE / IO)) * IO;
      reqs.push(encodeRequest({ flags: 0, type: CMD.WRITE, cookie: cookie++, offset: BigInt(offset), length: IO }), Buffer.alloc(IO, i));
      reqs.push(encodeRequest({ flags: 0, type: CMD.READ, cookie: cookie++, offset: BigInt(offset), length: IO }));
    }
    reqs.push(encodeRequest({ flags: 0, type: CMD.FLUSH, cookie: cookie++, offset: 0n, length: 0 }));
    // Until all 33 replies are in (simple: 16-byte header, + 4 KiB for a read; structured, which a server may
    // use for reads only: chunks of a 20-byte header + payload, the last of a reply flagged DONE).
    await new Promise<void>((resolve, reject) => {
      let buf = Buffer.alloc(0);
      let replies = 0;
      const end = (): void => {
        clearTimeout(timer);
        if (replies === 33) resolve();
        else reject(new Error(`warm-up: ${replies} of 33 replies (${structured ? 'structured' : 'simple'} replies)`));
      };
      const timer = setTimeout(end, 10_000);
      client.on('data', (d: Buffer) => {
        buf = Buffer.concat([buf, d]);
        for (;;) {
          if (buf.length < 16) break;
          let len = 16 + (Number(buf.readBigUInt64BE(8)) % 2 === 0 ? IO : 0); // a simple reply; even cookies are the reads
          let last = true;
          if (buf.readUInt32BE(0) !== SIMPLE_REPLY_MAGIC) {
            if (buf.length < 20) break;
            len = 20 + buf.readUInt32BE(16);
            last = (buf.readUInt16BE(4) & 1) === 1;
          }
          if (buf.length < len) break;
          buf = buf.subarray(len);
          if (last && ++replies === 33) return end();
        }
      });
      client.once('close', end);
      for (let i = 0; i < reqs.length; i += 8) client.write(Buffer.concat(reqs.slice(i, i + 8)));
    });
    client.end(encodeRequest({ flags: 0, type: CMD.DISC, cookie: cookie++, offset: 0n, length: 0 }));
    client.destroy();
  } finally {
    if (listener.listening) listener.close();
  }
}
