/**
 * SocketReader's chunk sink (src/nbd/reader.ts ChunkSink, issue 19): while the request loop waits for a
 * header, whole requests are consumed straight from the buffer Node reads into, and a request left cut at the
 * end of a chunk is held and completed from the next one. Every byte must still be seen once and in order —
 * by the sink or by the loop's reads — whatever the chunking, whichever requests the sink declines, across a
 * held fragment and the sink being taken away (the loop going on with the held bytes).
 */
import { describe, expect, it } from 'vitest';
import { type ChunkSink, SocketReader } from '../../src/nbd/reader.js';
import { sleep, socketPairs } from '../helpers/sockets.js';

const pair = socketPairs();

function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x / 0x1_0000_0000;
  };
}

/** Records of a 4-byte length and that many bytes (record i's bytes all (i & 255)), lengths 0 to 9000. */
function records(n: number, r: () => number): { data: Buffer; lens: number[] } {
  const lens = Array.from({ length: n }, () => (r() < 0.1 ? Math.floor(r() * 70_000) : Math.floor(r() * 9000)));
  const data = Buffer.alloc(lens.reduce((a, l) => a + 4 + l, 0));
  let at = 0;
  lens.forEach((l, i) => {
    data.writeUInt32BE(l, at);
    data.fill(i & 255, at + 4, at + 4 + l);
    at += 4 + l;
  });
  return { data, lens };
}

describe('SocketReader with a chunk sink', () => {
  for (const seed of [20261207, 7, 99]) {
    it(`every record once and in order, by the sink or by reads (seed ${seed})`, async () => {
      console.log(`reader-sink seed ${seed}`);
      const r = rng(seed);
      const rs = rng(seed + 1); // the sender's own (its turns interleave with the reader's)
      const { data, lens } = records(3000, r);
      const { server, client } = await pair();
      const reader = new SocketReader(server);
      expect(reader.useUserBuffer()).toBe(true);
      const seen: Buffer[] = [];
      let bySink = 0;
      let held = 0;
      const sink: ChunkSink = {
        consume: (b, at, end) => {
          const start = at;
          while (end - at >= 4) {
            const l = b.readUInt32BE(at);
            if (end - at - 4 < l || r() < 0.15) break; // cut, or declined: the loop reads it
            seen.push(Buffer.from(b.subarray(at, at + 4 + l)));
            bySink++;
            at += 4 + l;
          }
          return at - start;
        },
        what: () => 'record',
        need: (b, at, end) => {
          held++;
          if (r() < 0.1) return 0;
          return end - at < 4 ? 4 : 4 + b.readUInt32BE(at);
        },
      };
      // The client sends in pieces of random sizes, now and then pausing (chunks cut anywhere).
      const sending = (async () => {
        for (let at = 0; at < data.length;) {
          const k = Math.min(data.length - at, 1 + Math.floor(rs() * 90_000));
          if (!client.write(data.subarray(at, at + k))) await new Promise((res) => client.once('drain', res));
          at += k;
          if (rs() < 0.2) await sleep(1);
        }
        client.end();
      })();
      let closed: unknown = null;
      for (;;) {
        reader.sink = r() < 0.9 ? sink : null;
        let h: Buffer;
        try {
          h = await reader.read(4);
        } catch (e) {
          closed = e; // the client ended: everything was seen (checked below)
          break;
        } finally {
          reader.sink = null;
        }
        const p = await reader.read(h.readUInt32BE(0));
        seen.push(Buffer.concat([h, p]));
      }
      expect(String(closed)).toMatch(/closed/);
      await sending;
      const got = Buffer.concat(seen);
      expect(got.length, `bytes seen (seed ${seed})`).toBe(data.length);
      expect(got.equals(data), `bytes in order (seed ${seed})`).toBe(true);
      expect(seen.length).toBe(lens.length);
      expect(bySink, 'the sink took some records').toBeGreaterThan(100);
      expect(held, 'fragments were held across chunks').toBeGreaterThan(10);
    });
  }
});
