/**
 * Hostile (session 25): the close of a TLS connection at a handover must not be a reset. A TLS session cannot
 * move to another process (formats/nbd.md §5.5): the old worker answers the requests it holds whole and ends the
 * connection. Here the client pipelines 3 READs of 8 MiB whose replies it does not read yet, then keeps sending
 * WRITE payloads (several MiB) the server never reads — they sit in the server's kernel receive queue. Closing a
 * socket with unread received bytes makes Linux send RST, not FIN, and drop what it has not sent yet: replies
 * the server had already handed to its kernel were lost and the client read ECONNRESET. The client here reads
 * its replies late (after the handover) and must get every reply whole, then a clean end (close_notify / EOF).
 */
import { join } from 'node:path';
import * as tls from 'node:tls';
import { describe, expect, it } from 'vitest';
import { createImage } from '../../src/index.js';
import { CMD, SIMPLE_REPLY_MAGIC, encodeRequest } from '../../src/nbd/wire.js';
import { kscincAsync } from '../helpers/cli.js';
import { makePki } from '../helpers/pki.js';
import { spawnServe } from '../helpers/serve.js';
import { tempDir } from '../helpers/tmp.js';
import { pskRawClient } from './tls-raw-client.js';
import { runDir, until } from '../supervisor/helpers.js';

const dir = tempDir('kscinc-hostile-s25-tlsrst-');
const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 32 * MiB;
const READS = 3;
const READ_LEN = 8 * MiB;
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
const pki = makePki();

/** STARTTLS (PSK), the TLS handshake, then GO on the default export (simple replies); the TLS socket. */
async function tlsSocket(port: number): Promise<tls.TLSSocket> {
  const c = await pskRawClient(port, join(pki.psk, 'keys.psk'));
  c.reader.release();
  return c.socket as tls.TLSSocket;
}

/** The simple replies in a byte stream: READ cookies (1..READS) carry READ_LEN bytes of data. */
function parseReplies(b: Buffer): { reads: number; writes: number; errors: number; whole: boolean; bad: boolean } {
  let at = 0;
  let reads = 0;
  let writes = 0;
  let errors = 0;
  while (b.length - at >= 16) {
    if (b.readUInt32BE(at) !== SIMPLE_REPLY_MAGIC) return { reads, writes, errors, whole: false, bad: true };
    if (b.readUInt32BE(at + 4) !== 0) errors++;
    const cookie = b.readBigUInt64BE(at + 8);
    const len = cookie >= 1n && cookie <= BigInt(READS) ? READ_LEN : 0;
    if (b.length - at < 16 + len) break;
    at += 16 + len;
    if (len > 0) reads++;
    else writes++;
  }
  return { reads, writes, errors, whole: at === b.length, bad: false };
}

/**
 * `halfOpen`: the client does not end its side when the server's ends, and sends on: the server reads and
 * discards only so long (close-drain.ts: 1 s), then closes — the client has every reply by then, and what it
 * sees after the end may be a reset. Prints how long after the end the close came.
 */
async function scenario(name: string, halfOpen: boolean): Promise<void> {
  const img = join(dir, `${name}.ksc`);
  await createImage(img, { size: SIZE, blockSize: 64 * KiB });
  const env = { KSCINC_RUN_DIR: runDir() };
  const s = spawnServe([img, '--listen', '127.0.0.1:0', '--tls-psk', join(pki.psk, 'keys.psk')], { env, uri: /^nbds?:\/\/127\.0\.0\.1:\d+/, timeoutMs: 60_000 });
  const port = Number(/:(\d+)/.exec((await s.uris)[0]!.replace(/^nbds?:\/\//, ''))![1]);
  let sock: tls.TLSSocket | undefined;
  try {
    const t = await tlsSocket(port);
    sock = t;
    t.allowHalfOpen = halfOpen;
    const got: Buffer[] = [];
    let error = '';
    let ended = false;
    let endedAt = 0;
    let closedAt = 0;
    t.on('data', (d: Buffer) => got.push(d));
    t.on('error', (e: NodeJS.ErrnoException) => (error ||= e.code ?? e.message));
    t.on('end', () => {
      ended = true;
      endedAt = Date.now();
    });
    const closed = new Promise<void>((r) =>
      t.once('close', () => {
        closedAt = Date.now();
        r();
      }),
    );
    t.pause(); // replies are read late: the server's queue and both kernels' buffers fill
    const parts: Buffer[] = [];
    for (let k = 1; k <= READS; k++) parts.push(encodeRequest({ flags: 0, type: CMD.READ, cookie: BigInt(k), offset: 0n, length: READ_LEN }));
    t.write(Buffer.concat(parts));
    /** WRITEs of 256 KiB: `n` of them. */
    let cookie = 100n;
    const writes = (n: number): void => {
      for (let k = 0; k < n; k++) {
        const payload = Buffer.alloc(256 * KiB, Number(cookie % 200n) + 1);
        t.write(Buffer.concat([encodeRequest({ flags: 0, type: CMD.WRITE, cookie: cookie++, offset: BigInt((k % 64) * 256 * KiB), length: payload.length }), payload]));
      }
    };
    writes(16); // 4 MiB behind the READs
    await sleep(500);
    const up = kscincAsync(['upgrade', img], env);
    await until(() => /upgrade: starting a new worker/.test(s.stderr()), 60_000, 'the upgrade to begin');
    // More WRITE data while the old worker parks and ends the connection (it reads none of it: the handover run
    // takes only what it holds), so that the server's kernel holds received bytes it never read at the close;
    // the replies are read from a while after the park (the old worker waits for them to leave before it ends).
    let closing = false;
    void closed.then(() => (closing = true));
    const started = Date.now();
    let reading = false;
    while ((halfOpen || !ended) && !closing && Date.now() - started < 30_000) {
      if (t.writableLength < MiB && !t.destroyed) writes(2);
      if (!reading && Date.now() - started > 2500) {
        reading = true;
        t.resume(); // now read everything the server sent
      }
      await sleep(100);
    }
    await Promise.race([closed, sleep(30_000)]);
    const u = await up;
    expect(u.code, `upgrade: ${u.stderr}\n${s.stderr().slice(-3000)}`).toBe(0);
    const b = Buffer.concat(got);
    const r = parseReplies(b);
    const afterEnd = ended && closedAt > 0 ? closedAt - endedAt : -1;
    console.log(`${name}: client: ${b.length} bytes, ${r.reads} READ and ${r.writes} WRITE replies, whole ${r.whole}, end ${ended}, error ${error || 'none'}, closed ${afterEnd} ms after the end`);
    if (halfOpen) {
      expect({ ...r, ended }, `${name}: the client's view of the close (bytes ${b.length})\n${s.stderr().slice(-2000)}`).toEqual({
        reads: READS,
        writes: r.writes,
        errors: 0,
        whole: true,
        bad: false,
        ended: true,
      });
      expect(afterEnd, `${name}: the server's read-and-discard after its end is bounded (1 s; slack for a loaded machine)`).toBeGreaterThanOrEqual(0);
      expect(afterEnd).toBeLessThan(4000);
      return;
    }
    expect({ ...r, ended, error }, `the client's view of the close (bytes ${b.length}; WRITEs sent ${cookie - 100n})\n${s.stderr().slice(-2000)}`).toEqual({
      reads: READS,
      writes: r.writes,
      errors: 0,
      whole: true,
      bad: false,
      ended: true,
      error: '',
    });
  } finally {
    sock?.destroy();
    s.proc.kill('SIGTERM');
    expect(await s.exited).toBe(0);
  }
}

describe('TLS connection closed at a hot upgrade while its client is still sending', () => {
  it('the client gets every reply whole, then a clean end, not a reset', () => scenario('ends', false), 120_000);
  it('a client that does not end its side: every reply whole, the server closes within its bound', () => scenario('half-open', true), 120_000);
});
