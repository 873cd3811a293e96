/**
 * The base of an object-store wrapper (a cross-cutting concern wraps the same interface: faults, tracing,
 * tests watching a call): every base call of ObjectStore goes to `inner` unchanged, close too; a wrapper
 * overrides what it changes. The optional methods (putAfter, syncObject, listKeys, …) are not passed on
 * here: each wrapper passes on those whose meaning it keeps (one that passed putAfter on blindly would let
 * a commit step go by uncounted, say); without them the engines take their fallback paths.
 */
import type { Body, ObjectInfo, ObjectStore, WriteOpts } from './types.js';

export class StoreWrapper implements ObjectStore {
  readonly name: string;
  constructor(protected readonly inner: ObjectStore) {
    this.name = inner.name;
  }
  put(key: string, data: Body, opts?: WriteOpts): Promise<void> {
    return this.inner.put(key, data, opts);
  }
  get(key: string): Promise<Buffer> {
    return this.inner.get(key);
  }
  getUpTo(key: string, max: number): Promise<Buffer> {
    return this.inner.getUpTo(key, max);
  }
  getRange(key: string, offset: number, length: number): Promise<Buffer> {
    return this.inner.getRange(key, offset, length);
  }
  stat(key: string): Promise<ObjectInfo | null> {
    return this.inner.stat(key);
  }
  list(prefix: string): AsyncIterable<ObjectInfo> {
    return this.inner.list(prefix);
  }
  delete(key: string, opts?: WriteOpts): Promise<void> {
    return this.inner.delete(key, opts);
  }
  close(): Promise<void> {
    return this.inner.close();
  }
}
