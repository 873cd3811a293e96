/**
 * Bounded memory after the TLS handshake (formats/nbd.md §2.2 and §5): clients that complete STARTTLS and
 * GO, pipeline many big READs and never read the replies must not make `kscinc serve` hold more than its
 * byte budget, exactly as plain clients (test/nbd/limits.test.ts). TLS adds a layer that buffers: the
 * budget must count what waits in it. Afterwards a well-behaved TLS client is served.
 */
import * as tls from 'node:tls';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { NbdClient } from '../../src/nbd/client.js';
import { loadClientTls } from '../../src/nbd/client-tls.js';
import { SocketReader } from '../../src/nbd/reader.js';
import { CLIENT_FLAG_FIXED_NEWSTYLE, CMD, OPT, OPT_REPLY_MAGIC, REP, encodeOptionHeader, encodeRequest } from '../../src/nbd/wire.js';
import { kscinc } from '../helpers/cli.js';
import { makePki, x509ServeArgs, type Pki } from '../helpers/pki.js';
import { tempDir } from '../helpers/tmp.js';
import { childrenOf } from '../supervisor/helpers.js';
import { spawnServe } from '../helpers/serve.js';
import { RawClient, goData } from './helpers.js';

const MiB = 1 << 20;
const dir = tempDir('kscinc-tls-memory-');
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
let pki: Pki;

beforeAll(() => {
  pki = makePki();
}, 60_000);

function rssOne(pid: number): number {
  try {
    return Number(/VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))![1]) / 1024;
  } catch {
    return 0;
  }
}

/** RSS of `kscinc serve` and its worker, MiB. */
const rssMiB = (pid: number): number => [pid, ...childrenOf(pid)].reduce((s, p) => s + rssOne(p), 0);

async function optionReplies(r: SocketReader): Promise<number> {
  for (;;) {
    const h = await r.read(20);
    if (h.readBigUInt64BE(0) !== OPT_REPLY_MAGIC) throw new Error('bad option reply magic');
    await r.read(h.readUInt32BE(16));
    const type = h.readUInt32BE(12);
    if (type === REP.ACK || type >= 0x80000000) return type;
  }
}

/** A raw client past STARTTLS (X.509, client certificate) and GO with simple replies: the TLS socket. */
async function tlsClient(port: number): Promise<tls.TLSSocket> {
  const raw = await RawClient.connect(port);
  await raw.greeting();
  const f = Buffer.alloc(4);
  f.writeUInt32BE(CLIENT_FLAG_FIXED_NEWSTYLE);
  raw.socket.write(f);
  expect((await raw.option(OPT.STARTTLS))[0]!.type).toBe(REP.ACK);
  raw.reader.release();
  const x = pki.x509;
  const t = tls.connect({
    socket: raw.socket,
    ca: readFileSync(join(x, 'ca-cert.pem')),
    cert: readFileSync(join(x, 'client-cert.pem')),
    key: readFileSync(join(x, 'client-key.pem')),
    checkServerIdentity: () => undefined,
  });
  t.on('error', () => {});
  await new Promise((res, rej) => {
    t.once('secureConnect', res);
    t.once('error', rej);
  });
  const r = new SocketReader(t);
  const go = goData('');
  t.write(Buffer.concat([encodeOptionHeader(OPT.GO, go.length), go]));
  expect(await optionReplies(r)).toBe(REP.ACK);
  r.release();
  return t;
}

describe('NBD over TLS: bounded memory after the handshake', () => {
  it('40 TLS clients pipelining 32 × 32 MiB READs and never reading: the server holds under 2 budgets (256 MiB) more than idle, then serves a good client', async () => {
    const img = join(dir, 'mem.ksc');
    const made = kscinc(['create', '--size', String(1 << 30), img]);
    expect(made.code, made.stderr).toBe(0);
    const CLIENTS = Number(process.env.KSCINC_TEST_CLIENTS ?? 40);
    const srv = spawnServe([img, '--listen', '127.0.0.1:0', '--max-connections', String(CLIENTS + 1), ...x509ServeArgs(pki)], { uri: /^nbds:\/\//, timeoutMs: 30_000 });
    const port = Number(/:(\d+)\//.exec((await srv.uris)[0]!)![1]);
    const clients: tls.TLSSocket[] = [];
    try {
      const before = rssMiB(srv.proc.pid!);
      for (let i = 0; i < CLIENTS; i++) {
        const t = await tlsClient(port);
        t.pause(); // never reads again
        for (let k = 0; k < 32; k++) t.write(encodeRequest({ flags: 0, type: CMD.READ, cookie: BigInt(k), offset: BigInt(k * 32 * MiB), length: 32 * MiB }));
        clients.push(t);
      }
      let peak = 0;
      for (let i = 0; i < 16; i++) {
        await sleep(500);
        peak = Math.max(peak, rssMiB(srv.proc.pid!));
      }
      console.log(`server RSS ${before.toFixed(0)} MiB idle, peak ${peak.toFixed(0)} MiB (+${(peak - before).toFixed(0)}) with ${CLIENTS} TLS clients that never read`);
      // Each client asked for 1 GiB of replies (40 GiB in all). formats/nbd.md §5: the byte budget (128 MiB)
      // holds the plaintext replies; their ciphertext waiting in the TLS layer adds at most about as much
      // again. Measured +194 MiB with 10, 40 and 80 such clients alike (bounded, not per client).
      expect(peak - before).toBeLessThan(256);
    } finally {
      for (const t of clients) t.destroy();
    }
    const good = await NbdClient.connect({ port, tls: loadClientTls({ creds: pki.x509 }) });
    expect((await good.read(0, 4096)).equals(Buffer.alloc(4096))).toBe(true);
    await good.disconnect();
    srv.proc.kill('SIGTERM');
    expect(await srv.exited).toBe(0);
  }, 180_000);
});
