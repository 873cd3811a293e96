/**
 * A store whose changes wait for a check: every put, putAfter, delete and sweepTemp first awaits `check`, and
 * when it rejects that error is thrown and nothing is sent. Reads pass straight on. A repository opened under
 * a config without encryption takes its store through one (formats/repository.md §13.1 rule 2): the check
 * that the config was not stripped of its encryption then costs a reader nothing, and a writer waits for it
 * before its first change of anything (lock, pack, index, manifest, reference…), whichever engine sends it.
 */
import type { Body, ObjectInfo, ObjectStore, WriteOpts } from './types.js';

export class WriteGate implements ObjectStore {
  readonly name: string;
  getRangeInto?: ObjectStore['getRangeInto'];
  hostLock?: ObjectStore['hostLock'];
  sweepTemp?: ObjectStore['sweepTemp'];
  syncObject?: ObjectStore['syncObject'];
  putAfter?: ObjectStore['putAfter'];
  listKeys?: ObjectStore['listKeys'];

  /** `check`: awaited before each change; a rejection refuses it (a caller that never writes never sees it). */
  constructor(
    private readonly inner: ObjectStore,
    private readonly check: Promise<void>,
  ) {
    this.name = inner.name;
    check.catch(() => undefined); // told to a writer only, never unhandled
    // Passed on where the store has them, so the engines take production's paths, not the fallbacks.
    if (inner.putAfter) this.putAfter = async (key, data, after, opts) => this.gated(() => inner.putAfter!(key, data, after, opts), after);
    if (inner.sweepTemp) this.sweepTemp = async (ms, now) => this.gated(() => inner.sweepTemp!(ms, now));
    if (inner.listKeys) this.listKeys = (prefix) => inner.listKeys!(prefix);
    if (inner.getRangeInto) this.getRangeInto = (key, offset, target) => inner.getRangeInto!(key, offset, target);
    // Neither writes an object: a folder's flock (§8 rule 7), the sync of what a killed writer named (§9 rule 6).
    if (inner.syncObject) this.syncObject = (key) => inner.syncObject!(key);
    if (inner.hostLock) this.hostLock = (exclusive) => inner.hostLock!(exclusive);
  }

  /** `run` once the check passed; `after` (putAfter's) is awaited whatever happens, as putAfter promises. */
  private async gated<T>(run: () => Promise<T>, after?: Promise<unknown>): Promise<T> {
    try {
      await this.check;
    } catch (e) {
      await after?.catch(() => undefined);
      throw e;
    }
    return run();
  }

  put(key: string, data: Body, opts?: WriteOpts): Promise<void> {
    return this.gated(() => this.inner.put(key, data, opts));
  }
  delete(key: string, opts?: WriteOpts): Promise<void> {
    return this.gated(() => this.inner.delete(key, opts));
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
  /** Lets the check end first (no request of it outlives the store), then closes the store. */
  async close(): Promise<void> {
    await this.check.catch(() => undefined);
    return this.inner.close();
  }
}
