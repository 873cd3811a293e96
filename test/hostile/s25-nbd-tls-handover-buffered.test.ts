/**
 * Hostile (session 25): s23-nbd-tls-halfclose-handover with a client that does NOT end its sending: it pipelines
 * 3 READs of 32 MiB, 20 WRITEs and DISC over TLS (PSK), then reads its replies while the server is hot-upgraded.
 * The old worker holds the third READ until the client takes the first two (admission), so the WRITEs and the
 * DISC are in its reader when it is asked to park. A TLS session cannot move to another process: the old worker
 * runs the complete requests already in its reader, answers them and ends the connection (formats/nbd.md §5.5);
 * every request before DISC is answered, the WRITEs are on the image, and nothing hangs.
 *
 * The client reads while the upgrade runs, never after awaiting it: an upgrade waits for the replies of the
 * requests the old worker read to leave, so a client that waits for the upgrade before reading them waits on
 * itself until the stall timeout (60 s) cuts it — session 24's stall (its server Send-Q 8 MB, the client's
 * Recv-Q small: the client was not asked to read; started 10 s late it read all 96 MiB in 1.3 s).
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { createImage } from '../../src/index.js';
import { CMD, encodeRequest } from '../../src/nbd/wire.js';
import { kscincAsync } from '../helpers/cli.js';
import { makePki } from '../helpers/pki.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { spawnServe } from '../helpers/serve.js';
import { tempDir } from '../helpers/tmp.js';
import { pskRawClient } from './tls-raw-client.js';
import { runDir, until } from '../supervisor/helpers.js';
import { readImage } from './helpers.js';

const dir = tempDir('kscinc-hostile-s25-tlsbuf-');
const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 32 * MiB;
const WRITES = 20;
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
const pki = makePki();

async function scenario(name: string, upgrade: boolean): Promise<void> {
  const seed = seedFor(`test/hostile/s25-nbd-tls-handover-buffered.test.ts ${name}`);
  console.log(`${name}: seed ${seed}`);
  const rng = new Rng(seed);
  const img = join(dir, `${name}.ksc`);
  await createImage(img, { size: SIZE, blockSize: 64 * KiB });
  const env = { KSCINC_RUN_DIR: runDir() };
  const s = spawnServe([img, '--listen', '127.0.0.1:0', '--tls-psk', join(pki.psk, 'keys.psk')], { env, uri: /^nbds?:\/\/127\.0\.0\.1:\d+/, timeoutMs: 60_000 });
  const port = Number(/:(\d+)/.exec((await s.uris)[0]!.replace(/^nbds?:\/\//, ''))![1]);
  const expected = Buffer.alloc(SIZE);
  const answered = new Map<bigint, number>();
  try {
    const c = await pskRawClient(port, join(pki.psk, 'keys.psk'));
    const parts: Buffer[] = [];
    for (let k = 1; k <= 3; k++) parts.push(encodeRequest({ flags: 0, type: CMD.READ, cookie: BigInt(k), offset: 0n, length: 32 * MiB }));
    for (let k = 0; k < WRITES; k++) {
      const data = rng.bytes(512);
      const off = k * 64 * KiB + 512 * rng.int(0, 127);
      data.copy(expected, off);
      parts.push(encodeRequest({ flags: 0, type: CMD.WRITE, cookie: BigInt(100 + k), offset: BigInt(off), length: 512 }), data);
    }
    parts.push(encodeRequest({ flags: 0, type: CMD.DISC, cookie: 999n, offset: 0n, length: 0 }));
    c.socket.write(Buffer.concat(parts));
    // No end(): the client keeps its sending open, as a live client does.
    await sleep(300);
    let up: ReturnType<typeof kscincAsync> | null = null;
    if (upgrade) {
      up = kscincAsync(['upgrade', img], env);
      await until(() => /upgrade: starting a new worker/.test(s.stderr()), 60_000, 'the upgrade to begin');
      await sleep(1500); // the supervisor asks the old worker to park (a second after, as a rule)
    }
    // The three READs' replies first (the client reads them whole), then the WRITEs' (no data).
    // One reply() at a time (the reader takes one read at once): a timed-out one ends the reading.
    let reading = true;
    for (let k = 1; k <= 3 && reading; k++) {
      const r = await Promise.race([c.reply(32 * MiB).catch(() => null), sleep(30_000).then(() => null)]);
      if (r) answered.set(r.cookie, r.error);
      else reading = false;
    }
    for (; reading;) {
      const r = await Promise.race([c.reply().catch(() => null), c.closed.then(() => null), sleep(30_000).then(() => null)]);
      if (!r) break;
      answered.set(r.cookie, r.error);
      if (answered.size === 3 + WRITES) break;
    }
    if (up) {
      const u = await up;
      expect(u.code, `upgrade: ${u.stderr}\n${s.stderr().slice(-3000)}`).toBe(0);
    }
    const closed = await Promise.race([c.closed.then(() => true), sleep(20_000).then(() => false)]);
    c.socket.destroy();
    const wrote = [...answered.keys()].filter((k) => k >= 100n).length;
    expect(
      { answered: answered.size, wrote, errors: [...answered.values()].filter((e) => e !== 0).length, closed },
      `${name}: requests before DISC answered (of ${3 + WRITES}), WRITEs answered (of ${WRITES}), connection closed by the server; seed ${seed}\n${s.stderr().slice(-2000)}`,
    ).toEqual({ answered: 3 + WRITES, wrote: WRITES, errors: 0, closed: true });
    // The old worker ran the requests in its reader (handover-run.ts); without a handover there is no such run.
    const ran = /the (\d+) request\(s\) received whole are run/.exec(s.stderr());
    expect(ran ? Number(ran[1]) : 0, `${name}: requests run by the old worker at the handover (its log line)\n${s.stderr().slice(-2000)}`)[upgrade ? 'toBeGreaterThan' : 'toBe'](0);
  } finally {
    s.proc.kill('SIGTERM');
    expect(await s.exited).toBe(0);
  }
  const got = await readImage(img, SIZE);
  let landed = 0;
  for (let k = 0; k < WRITES; k++) if (Buffer.compare(got.subarray(k * 64 * KiB, (k + 1) * 64 * KiB), expected.subarray(k * 64 * KiB, (k + 1) * 64 * KiB)) === 0) landed++;
  expect(landed, `${name}: WRITEs on the image, of ${WRITES}`).toBe(WRITES);
}

describe('TLS client that keeps its sending open, pipelining during a hot upgrade', () => {
  it('without a handover: every request before DISC answered', () => scenario('plain-run', false), 60_000);
  it("during a hot upgrade: the complete requests in the old worker's reader are run and answered, WRITEs landed, then a close", () => scenario('handover', true), 120_000);
});
