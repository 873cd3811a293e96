/**
 * Hostile (session 23): s22-nbd-halfclose-handover over TLS (PSK). A client pipelines requests, then DISC,
 * then ends its sending (close_notify and FIN) while the server is hot-upgraded. A TLS session cannot move to
 * another process, so the old worker closes a TLS connection at the handover (a client that is still sending
 * reconnects and sends again what got no reply); a client that has sent its DISC and ended its sending will
 * not: NBD says the server MUST handle all outstanding requests before it closes. Every request before the
 * DISC must be answered and every WRITE be on the image. The same without an upgrade is checked first (the
 * TLS socket must let replies out after the peer's end).
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { createImage } from '../../src/index.js';
import { kscincAsync } from '../helpers/cli.js';
import { makePki } from '../helpers/pki.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { spawnServe } from '../helpers/serve.js';
import { tempDir } from '../helpers/tmp.js';
import { pskRawClient } from './tls-raw-client.js';
import { runDir, until } from '../supervisor/helpers.js';
import { HALF_CLOSE_WRITES, halfCloseBatch, landedWrites, readHalfCloseReplies } from './halfclose.js';

const dir = tempDir('kscinc-hostile-s23-tlshc-');
const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 32 * MiB;
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
const pki = makePki();

async function scenario(name: string, upgrade: boolean): Promise<void> {
  const seed = seedFor(`test/hostile/s23-nbd-tls-halfclose-handover.test.ts ${name}`);
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
    c.socket.write(halfCloseBatch(rng, expected));
    c.socket.end(); // close_notify and FIN: the client sends nothing more, and reads no reply yet
    await sleep(300);
    let up: ReturnType<typeof kscincAsync> | null = null;
    if (upgrade) {
      up = kscincAsync(['upgrade', img], env);
      await until(() => /upgrade: starting a new worker/.test(s.stderr()), 60_000, 'the upgrade to begin');
      await sleep(1500); // the supervisor asks the old worker to park (a second after, as a rule)
    }
    // The three READs' replies first (the client reads them whole), then the WRITEs' (no data).
    await readHalfCloseReplies(c, answered);
    if (up) {
      const u = await up;
      expect(u.code, `upgrade: ${u.stderr}\n${s.stderr().slice(-3000)}`).toBe(0);
    }
    const closed = await Promise.race([c.closed.then(() => true), sleep(20_000).then(() => false)]);
    c.socket.destroy();
    const wrote = [...answered.keys()].filter((k) => k >= 100n).length;
    expect(
      { answered: answered.size, wrote, errors: [...answered.values()].filter((e) => e !== 0).length, closed },
      `${name}: requests before DISC answered (of ${3 + HALF_CLOSE_WRITES}), WRITEs answered (of ${HALF_CLOSE_WRITES}), connection closed by the server; seed ${seed}\n${s.stderr().slice(-2000)}`,
    ).toEqual({ answered: 3 + HALF_CLOSE_WRITES, wrote: HALF_CLOSE_WRITES, errors: 0, closed: true });
  } finally {
    s.proc.kill('SIGTERM');
    expect(await s.exited).toBe(0);
  }
  const landed = await landedWrites(img, expected);
  expect(landed, `${name}: WRITEs on the image, of ${HALF_CLOSE_WRITES}`).toBe(HALF_CLOSE_WRITES);
}

describe('half-closed TLS client', () => {
  it('without a handover: every request before DISC answered after the peer ended its sending', () => scenario('plain-run', false), 60_000);
  it('during a hot upgrade: every request before DISC answered and landed (the TLS session cannot move)', () => scenario('handover', true), 120_000);
});
