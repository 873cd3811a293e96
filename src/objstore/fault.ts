/**
 * Fault injection at the object-store layer, two ways:
 *  - withStoreFaults: the crash-test steps of io/fault.ts (one plan, one counter with the host files:
 *    KSC_FAULT_AFTER=N kills the process, or with KSC_FAULT_ACTION=throw fails, before its step N + 1). A
 *    step is a durable put or delete, or a sweep of temporary parts; reads, lists, stats, lock leases
 *    (non-durable writes) and the host lock are never faulted. openStore installs it when a plan exists.
 *  - FaultStore, for tests only (not in the library's exports): a rule sees each call (operation, key, index
 *    of the call among calls of that operation, from 0) and may delay it, fail it, or damage the bytes it
 *    moves (on put the damaged bytes are stored; on get/getRange they are returned). Calls are counted per
 *    operation.
 */
import { faultGate, type StepGate } from '../io/fault.js';
import { bodyBuffer, type Body, type ObjectInfo, type ObjectStore, type WriteOpts } from './types.js';
import { StoreWrapper } from './wrapper.js';

/** `store` behind the fault plan's steps when a plan is installed (see io/fault.ts); otherwise `store` itself. */
export function withStoreFaults(store: ObjectStore): ObjectStore {
  const gate = faultGate();
  return gate ? new StepFaultStore(store, gate) : store;
}

class StepFaultStore extends StoreWrapper {
  getRangeInto?: ObjectStore['getRangeInto'];
  hostLock?: ObjectStore['hostLock'];
  sweepTemp?: ObjectStore['sweepTemp'];
  syncObject?: ObjectStore['syncObject'];
  putAfter?: ObjectStore['putAfter'];
  listKeys?: ObjectStore['listKeys'];

  constructor(
    inner: ObjectStore,
    private readonly gate: StepGate,
  ) {
    super(inner);
    // Passed on where the store has them, so a crash test runs production's commit path, not the fallback.
    if (inner.putAfter) this.putAfter = (key, data, after, opts) => this.putAfterStep(inner, key, data, after, opts);
    if (inner.listKeys) this.listKeys = (prefix) => inner.listKeys!(prefix);
    // Passed on, not a step of its own (it makes an object durable, changes nothing a reader sees).
    if (inner.syncObject) this.syncObject = (key) => inner.syncObject!(key);
    if (inner.getRangeInto) this.getRangeInto = (key, offset, target) => inner.getRangeInto!(key, offset, target);
    if (inner.hostLock) this.hostLock = (exclusive) => inner.hostLock!(exclusive);
    if (inner.sweepTemp) this.sweepTemp = (ms, now) => gate(`${inner.name}: sweep of temporary parts`, () => inner.sweepTemp!(ms, now));
  }

  override put(key: string, data: Body, opts?: WriteOpts): Promise<void> {
    if (opts?.durable === false) return this.inner.put(key, data, opts);
    return this.gate(`${this.name}/${key}: put`, () => this.inner.put(key, data, opts));
  }
  /**
   * One step, asked for once `after` resolved (where the object gets its key: its part is written meanwhile,
   * as without the plan), so steps are numbered in the order objects appear; a step refused fails `after` as
   * the inner store sees it, which then names nothing. The step lasts until the inner put ends.
   */
  private putAfterStep(inner: ObjectStore, key: string, data: Body, after: Promise<unknown>, opts?: WriteOpts): Promise<void> {
    if (opts?.durable === false) return inner.putAfter!(key, data, after, opts);
    const admitted = after.then(
      () =>
        new Promise<void>((admit, refuse) => {
          this.gate(`${this.name}/${key}: put`, () => {
            admit();
            return put;
          }).catch(refuse);
        }),
    );
    // `put` is read only once `after` resolved (a later microtask), never before it is set.
    const put = inner.putAfter!(key, data, admitted, opts);
    return put;
  }
  override delete(key: string, opts?: WriteOpts): Promise<void> {
    if (opts?.durable === false) return this.inner.delete(key, opts);
    return this.gate(`${this.name}/${key}: delete`, () => this.inner.delete(key, opts));
  }
}

export type FaultOp = 'put' | 'get' | 'getRange' | 'stat' | 'list' | 'delete';

export interface Fault {
  /** Wait this long first. */
  delayMs?: number;
  /** Throw this instead of calling the store (for list: after `afterItems` items). */
  error?: unknown;
  /** list only: yield this many items before throwing `error`. */
  afterItems?: number;
  /** Keep only the first N bytes of the data. */
  truncate?: number;
  /** Flip bit N (counted from bit 0 of byte 0, modulo the data's length in bits). */
  flipBit?: number;
}

export type FaultRule = (op: FaultOp, key: string, callIndex: number) => Fault | undefined | void;

function damage(data: Buffer, f: Fault): Buffer {
  let out = data;
  if (f.truncate !== undefined && f.truncate < out.length) out = out.subarray(0, f.truncate);
  if (f.flipBit !== undefined && out.length > 0) {
    out = Buffer.from(out);
    const bit = f.flipBit % (out.length * 8);
    out[bit >> 3] = out[bit >> 3]! ^ (1 << (bit & 7));
  }
  return out;
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export class FaultStore implements ObjectStore {
  readonly name: string;
  readonly calls: Record<FaultOp, number> = { put: 0, get: 0, getRange: 0, stat: 0, list: 0, delete: 0 };

  constructor(
    private readonly inner: ObjectStore,
    public rule: FaultRule = () => undefined,
  ) {
    this.name = inner.name;
  }

  /** Counts the call, applies the delay, throws the rule's error unless `deferError`; returns the fault. */
  private async enter(op: FaultOp, key: string, deferError = false): Promise<Fault> {
    const f = this.rule(op, key, this.calls[op]++) ?? {};
    if (f.delayMs) await sleep(f.delayMs);
    if (f.error !== undefined && !deferError) throw f.error;
    return f;
  }

  async put(key: string, data: Body, opts?: WriteOpts): Promise<void> {
    const f = await this.enter('put', key);
    if (f.truncate === undefined && f.flipBit === undefined) return this.inner.put(key, data, opts);
    return this.inner.put(key, damage(bodyBuffer(data), f), opts);
  }
  async get(key: string): Promise<Buffer> {
    const f = await this.enter('get', key);
    return damage(await this.inner.get(key), f);
  }
  /** Counted and damaged as a get (it reads a whole small object). */
  async getUpTo(key: string, max: number): Promise<Buffer> {
    const f = await this.enter('get', key);
    return damage(await this.inner.getUpTo(key, max), f);
  }
  async getRange(key: string, offset: number, length: number): Promise<Buffer> {
    const f = await this.enter('getRange', key);
    return damage(await this.inner.getRange(key, offset, length), f);
  }
  async stat(key: string): Promise<ObjectInfo | null> {
    await this.enter('stat', key);
    return this.inner.stat(key);
  }
  async delete(key: string, opts?: WriteOpts): Promise<void> {
    await this.enter('delete', key);
    return this.inner.delete(key, opts);
  }
  async *list(prefix: string): AsyncIterable<ObjectInfo> {
    const f = await this.enter('list', prefix, true);
    let n = 0;
    if (f.error !== undefined && !f.afterItems) throw f.error;
    for await (const item of this.inner.list(prefix)) {
      yield item;
      if (f.error !== undefined && ++n >= f.afterItems!) throw f.error;
    }
  }
  close(): Promise<void> {
    return this.inner.close();
  }
}
