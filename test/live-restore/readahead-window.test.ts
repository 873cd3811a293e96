/**
 * The readahead window of a live restore (src/image/repo-readahead.ts): which chunks a sequential reader
 * gets fetched ahead, seeing only the reads that go through to the repository.
 */
import { describe, expect, it } from 'vitest';
import { ReadaheadWindow } from '../../src/image/repo-readahead.js';

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
