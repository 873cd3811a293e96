/**
 * A store wrapper (src/objstore/wrapper.ts: every base call passed to `inner`) for tests to extend where they
 * watch or steer one operation (record puts, hold a listing). close() leaves `inner` open: the test that made
 * it closes it.
 *
 * By default no optional ObjectStore method is passed on, so the engines take their fallback paths (putAfter →
 * await then put, listKeys → list, …). A test that means production's path over a store that has them (FsStore:
 * putAfter, listKeys, syncObject, hostLock, …) asks for `passOptional`: then each optional method `inner` has is
 * passed on, except where the subclass overrides the base call it stands for (a subclass that holds list() would
 * be bypassed by a passed listKeys, one that records put() by a passed putAfter): those stay off unless the
 * subclass defines them itself (on its prototype: such a definition is never replaced here). Only methods
 * of the subclass's class count: a test that replaces put() on the instance after construction asks for none.
 */
import { StoreWrapper } from '../../src/objstore/wrapper.js';
import type { Body, HostLock, ObjectStore, WriteOpts } from '../../src/objstore/types.js';

export interface PassThroughOpts {
  /** Pass on the optional methods of `inner` (production's paths); default false (the fallback paths). */
  passOptional?: boolean;
}

type Optional = 'putAfter' | 'getRangeInto' | 'listKeys' | 'syncObject' | 'hostLock' | 'sweepTemp';

/** Each optional method and the base call it stands for (null: none, it adds what no base call does). */
const STANDS_FOR: Record<Optional, keyof StoreWrapper | null> = {
  putAfter: 'put',
  getRangeInto: 'getRange',
  listKeys: 'list',
  syncObject: null,
  hostLock: null,
  sweepTemp: null,
};

/**
 * The optional methods, declared as methods (a subclass may define one on its prototype) and without a class
 * field (one would be set on the instance, hiding such a definition).
 */
export interface PassThroughStore {
  putAfter?(key: string, data: Body, after: Promise<unknown>, opts?: WriteOpts): Promise<void>;
  getRangeInto?(key: string, offset: number, target: Buffer): Promise<void>;
  listKeys?(prefix: string): AsyncIterable<string>;
  syncObject?(key: string): Promise<void>;
  hostLock?(exclusive: boolean): Promise<HostLock | null>;
  sweepTemp?(olderThanMs: number, now?: number): Promise<{ count: number; bytes: number }>;
}

export class PassThroughStore extends StoreWrapper {
  constructor(inner: ObjectStore, opts: PassThroughOpts = {}) {
    super(inner);
    for (const name of Object.keys(STANDS_FOR) as Optional[]) {
      const own = Object.getPrototypeOf(this) as Record<string, unknown>;
      if (name in own) continue; // the subclass defines it: keep that
      if (!opts.passOptional || inner[name] === undefined) continue;
      const base = STANDS_FOR[name];
      // The subclass changes the base call: a passed shortcut would bypass it.
      if (base !== null && own[base] !== StoreWrapper.prototype[base]) continue;
      const fn = inner[name] as (...args: unknown[]) => unknown;
      (this as Record<string, unknown>)[name] = (...args: unknown[]) => fn.apply(inner, args);
    }
  }

  override close(): Promise<void> {
    return Promise.resolve();
  }
}
