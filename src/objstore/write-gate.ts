/**
 * A store whose changes wait for a check: every put, putAfter, delete and sweepTemp first awaits `check`, and
 * when it rejects that error is thrown and nothing is sent. Reads pass straight on. A repository opened under
 * a config without encryption takes its store through one (formats/repository.md §13.1 rule 2): the check
 * that the config was not stripped of its encryption then costs a reader nothing, and a writer waits for it
 * before its first change of anything (lock, pack, index, manifest, reference…), whichever engine sends it.
 * A StoreWrapper: only the changes (put, delete, putAfter, sweepTemp) and close are its own.
 */
import { KscError } from '../errors.js';
import type { Body, ObjectInfo, ObjectStore, WriteOpts } from './types.js';
import { StoreWrapper } from './wrapper.js';

/**
 * The store as a gate's check reads it: once the gate is closed, a request of the check not yet sent fails
 * (KSC_E_CLOSED) instead of going out after the store was closed (on S3 a new connection to a gateway that
 * hangs would hold the process for its idle timeout), and the check settles.
 */
export class CheckView extends StoreWrapper {
  private ended = false;
  /** No request goes out from now on. */
  end(): void {
    this.ended = true;
  }
  private live(): void {
    if (this.ended) throw new KscError('KSC_E_CLOSED', `${this.name}: closed while the check of its config was reading it`);
  }
  override async get(key: string): Promise<Buffer> {
    this.live();
    return this.inner.get(key);
  }
  override async getUpTo(key: string, max: number): Promise<Buffer> {
    this.live();
    return this.inner.getUpTo(key, max);
  }
  override async getRange(key: string, offset: number, length: number): Promise<Buffer> {
    this.live();
    return this.inner.getRange(key, offset, length);
  }
  override async stat(key: string): Promise<ObjectInfo | null> {
    this.live();
    return this.inner.stat(key);
  }
  override async *list(prefix: string): AsyncIterable<ObjectInfo> {
    this.live();
    for await (const o of this.inner.list(prefix)) {
      this.live();
      yield o;
    }
  }
  /** The view does not own the store: closing it only ends it. */
  override close(): Promise<void> {
    this.end();
    return Promise.resolve();
  }
}

export class WriteGate extends StoreWrapper {
  getRangeInto?: ObjectStore['getRangeInto'];
  hostLock?: ObjectStore['hostLock'];
  sweepTemp?: ObjectStore['sweepTemp'];
  syncObject?: ObjectStore['syncObject'];
  putAfter?: ObjectStore['putAfter'];
  listKeys?: ObjectStore['listKeys'];

  /**
   * `check`: awaited before each change; a rejection refuses it (a caller that never writes never sees it).
   * `view`: the store as the check reads it, ended when the gate is closed.
   */
  constructor(
    inner: ObjectStore,
    private readonly check: Promise<void>,
    private readonly view?: CheckView,
  ) {
    super(inner);
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

  override put(key: string, data: Body, opts?: WriteOpts): Promise<void> {
    return this.gated(() => this.inner.put(key, data, opts));
  }
  override delete(key: string, opts?: WriteOpts): Promise<void> {
    return this.gated(() => this.inner.delete(key, opts));
  }
  /**
   * Ends the check without closing the store, for a repository opened on a store its caller goes on owning
   * and then dropped: no request of the check goes out any more, and one in flight is cut when the owner
   * closes the store. Not awaited here (on a gateway that hangs it would never settle before that close).
   */
  endCheck(): void {
    this.view?.end();
  }

  /**
   * Ends the check: no request of it goes out any more (its view ends), the store closes (on S3 that cuts
   * the requests in flight), and the check has settled when this returns (nothing of it outlives the close).
   */
  override async close(): Promise<void> {
    this.view?.end();
    try {
      await this.inner.close();
    } finally {
      await this.check.catch(() => undefined);
    }
  }
}
