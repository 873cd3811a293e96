/**
 * The readahead window of a live restore (src/image/repo-readahead.ts): which chunks a sequential reader
 * gets fetched ahead, seeing only the reads that go through to the repository; and the streams of an image
 * (ReadaheadStreams: a window per reader, interleaved readers each followed).
 */
import { describe, expect, it } from 'vitest';
import { type AheadRange, ReadaheadStreams, ReadaheadWindow } from '../../src/image/repo-readahead.js';
import { Rng, seedFor } from '../helpers/rng.js';

const C = 1024 * 1024;
/** A read of chunk k, whole. */
const at = (w: ReadaheadWindow, k: number) => w.onRead(k * C, C);

describe('readahead window', () => {
  it('starts at the initial size on the second sequential read; nothing for a first read or a jump', () => {
    const w = new ReadaheadWindow(C, 1000, 4, 32);
    expect(at(w, 0)).toBeNull();
    expect(at(w, 1)).toEqual({ from: 2, to: 6 });
    expect(at(w, 50)).toBeNull(); // a jump
    expect(at(w, 51)).toEqual({ from: 52, to: 56 });
  });

  it('asks for the next batch when less than half a window is left ahead, not one chunk per read', () => {
    const w = new ReadaheadWindow(C, 1000, 8, 8);
    at(w, 0);
    expect(at(w, 1)).toEqual({ from: 2, to: 10 });
    for (const k of [2, 3, 4, 5]) expect(at(w, k)).toBeNull(); // 7, 6, 5, 4 ahead
    expect(at(w, 6)).toEqual({ from: 10, to: 15 }); // 3 ahead: up to 8 ahead
  });

  it('the window doubles with each batch of a sequential reader, up to the maximum; a jump starts it again', () => {
    const w = new ReadaheadWindow(C, 1000, 4, 16);
    at(w, 0);
    expect(at(w, 1)).toEqual({ from: 2, to: 6 });
    expect(w.window).toBe(8);
    expect(at(w, 2)).toEqual({ from: 6, to: 11 }); // 3 ahead, less than 4
    expect(at(w, 3)).toEqual({ from: 11, to: 20 }); // 7 ahead, less than 8
    expect(w.window).toBe(16);
    for (let k = 4; k < 12; k++) expect(at(w, k)).toBeNull();
    expect(at(w, 12)).toEqual({ from: 20, to: 29 });
    expect(w.window).toBe(16);
    at(w, 500);
    expect(w.window).toBe(4);
  });

  it('the same read told twice (the image, then the backing) counts once', () => {
    const w = new ReadaheadWindow(C, 1000, 4, 16);
    at(w, 0);
    expect(at(w, 1)).toEqual({ from: 2, to: 6 });
    expect(at(w, 1)).toBeNull();
    expect(w.window).toBe(8);
  });

  it('without the image telling it of local reads: a read just past the window (the reader read the filled chunks unseen) is sequential', () => {
    const w = new ReadaheadWindow(C, 1000, 4, 16);
    at(w, 0);
    expect(at(w, 1)).toEqual({ from: 2, to: 6 });
    expect(at(w, 6)).toEqual({ from: 7, to: 15 });
    expect(at(w, 15)).toEqual({ from: 16, to: 32 });
  });

  it('a read past a run of chunks that need no fetch (zero chunks: NBD holes, never read through) is still sequential', () => {
    const zero = (k: number) => k >= 6 && k < 20;
    const w = new ReadaheadWindow(C, 1000, 4, 16, zero);
    at(w, 0);
    expect(at(w, 1)).toEqual({ from: 2, to: 6 });
    // 2..5 local, 6..19 zero: the next read through is 20.
    expect(at(w, 20)).toEqual({ from: 21, to: 29 });
    // The same right after a read, without a window: 21..28 ahead now; a reader that jumps over zeros from 28.
    const v = new ReadaheadWindow(C, 1000, 4, 16, (k) => k >= 1 && k < 9);
    at(v, 0);
    expect(at(v, 9)).toEqual({ from: 10, to: 14 });
    // A jump over chunks that hold data is a jump.
    expect(at(v, 40)).toBeNull();
  });

  it('a read the image tells of (local or not: mayStart false) keeps a window going but starts none', () => {
    const w = new ReadaheadWindow(C, 1000, 4, 16);
    expect(w.onRead(0, C, false)).toBeNull();
    expect(w.onRead(C, C, false)).toBeNull(); // a reader of what the guest wrote: nothing fetched
    expect(at(w, 1)).toBeNull(); // the backing hears of chunk 1 now: the reader's first read through
    expect(at(w, 2)).toEqual({ from: 3, to: 7 });
    expect(w.onRead(3 * C, C, false)).toEqual({ from: 7, to: 12 }); // read from the image, the window goes on
    expect(at(w, 3)).toBeNull(); // told twice
  });

  it('stops at the end of the disk; off with an initial window of 0', () => {
    const w = new ReadaheadWindow(C, 8, 4, 16);
    at(w, 4);
    expect(at(w, 5)).toEqual({ from: 6, to: 8 });
    expect(at(w, 7)).toBeNull();
    const off = new ReadaheadWindow(C, 8, 0, 0);
    at(off, 0);
    expect(at(off, 1)).toBeNull();
  });

  it('a read inside a chunk and the next piece of it continue the reader (4 KiB reads)', () => {
    const w = new ReadaheadWindow(C, 100, 4, 16);
    expect(w.onRead(0, 4096)).toBeNull();
    expect(w.onRead(4096, 4096)).toEqual({ from: 1, to: 5 });
    expect(w.onRead(8192, 4096)).toBeNull();
  });
});

/** A read of chunk k, whole, told to the streams. */
const sat = (s: ReadaheadStreams, k: number, grant?: (r: AheadRange) => number) => s.onRead(k * C, C, true, grant);

describe('readahead streams (a window per reader)', () => {
  it('4 interleaved sequential readers each keep a growing window (one window per image saw only jumps)', () => {
    const s = new ReadaheadStreams(C, 10_000, 4, 32);
    const asked = [0, 0, 0, 0];
    const batches = [0, 0, 0, 0];
    for (let r = 0; r < 40; r++) {
      for (let i = 0; i < 4; i++) {
        const got = sat(s, i * 1000 + r);
        if (got) {
          asked[i] += got.to - got.from;
          batches[i]++;
          expect(got.from).toBeGreaterThan(i * 1000 + r); // ahead of that reader, not another's
        }
      }
    }
    expect(s.count).toBe(4);
    expect(s.windows).toEqual([32, 32, 32, 32]);
    for (let i = 0; i < 4; i++) {
      expect(asked[i]).toBeGreaterThanOrEqual(38); // everything after its first two reads, and more ahead
      expect(batches[i]).toBeLessThan(12); // in batches, not a chunk per read
    }
    // The single window of before, for the record: every read of these readers was a jump.
    const one = new ReadaheadWindow(C, 10_000, 4, 32);
    let n = 0;
    for (let r = 0; r < 40; r++) for (let i = 0; i < 4; i++) if (one.onRead((i * 1000 + r) * C, C)) n++;
    expect(n).toBe(0);
  });

  it('a random reader starts no readahead, and leaves the sequential readers theirs', () => {
    const seed = seedFor('test/live-restore/readahead-window.test.ts');
    const rng = new Rng(seed);
    const CHUNKS = 100_000_000; // positions far apart: a random read lands next to an earlier one about never
    const s = new ReadaheadStreams(C, CHUNKS, 4, 32);
    let randomAsked = 0;
    let seqAsked = 0;
    for (let r = 0; r < 2000; r++) {
      if (sat(s, rng.int(0, CHUNKS - 1))) randomAsked++;
      const got = sat(s, 5 + r);
      if (got) seqAsked += got.to - got.from;
      if (sat(s, rng.int(0, CHUNKS - 1))) randomAsked++;
    }
    expect(randomAsked, `seed ${seed}`).toBe(0);
    expect(seqAsked).toBeGreaterThanOrEqual(1998);
  });

  it('up to 8 streams: a 9th reader replaces the least recently used one', () => {
    const s = new ReadaheadStreams(C, 100_000, 4, 32);
    for (let i = 0; i < 8; i++) sat(s, i * 1000);
    for (let i = 1; i < 8; i++) expect(sat(s, i * 1000 + 1)).toEqual({ from: i * 1000 + 2, to: i * 1000 + 6 }); // 0 is now the oldest
    expect(s.count).toBe(8);
    expect(sat(s, 50_000)).toBeNull(); // a 9th reader: in place of reader 0
    expect(s.count).toBe(8);
    expect(sat(s, 1)).toBeNull(); // reader 0 again: its stream is gone, a new one (in place of reader 1's)
    expect(sat(s, 2)).toEqual({ from: 3, to: 7 });
    expect(sat(s, 2002)).toEqual({ from: 2006, to: 2011 }); // reader 2 kept its window (3 ahead of 8)
  });

  it('a read told by the image (mayStart false) never starts a stream; the same read told twice counts once', () => {
    const s = new ReadaheadStreams(C, 1000, 4, 32);
    expect(s.onRead(0, C, false)).toBeNull();
    expect(s.count).toBe(0);
    sat(s, 0);
    expect(s.onRead(C, C, false)).toBeNull(); // no window yet: nothing
    expect(sat(s, 1)).toEqual({ from: 2, to: 6 });
    expect(s.onRead(2 * C, C, false)).toEqual({ from: 6, to: 11 });
    expect(sat(s, 2)).toBeNull(); // told twice
    expect(s.count).toBe(1);
  });

  it('a batch the caller cuts short (the bound on readahead in flight) is asked for again at the next read', () => {
    const s = new ReadaheadStreams(C, 1000, 4, 32);
    sat(s, 0);
    expect(sat(s, 1, (r) => r.from)).toBeNull(); // nothing granted
    expect(s.windows).toEqual([4]);
    expect(sat(s, 2, (r) => r.from + 2)).toEqual({ from: 3, to: 5 }); // 2 of 4 granted: the window does not grow
    expect(s.windows).toEqual([4]);
    expect(sat(s, 3)).toEqual({ from: 5, to: 8 }); // the rest, up to a window ahead
    expect(s.windows).toEqual([8]);
  });
});
