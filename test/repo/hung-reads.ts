/**
 * A folder store that answers like an S3 gateway that hangs on reads of index objects, for the tests of
 * §13.1 rule 2's sealed-object probe and the close of a repository (open-close, write-gate-close): a read of
 * an index object in flight when the store closes is cut (as closing the S3 store destroys its
 * connections), one sent after the close never answers (a new connection to the hung gateway). Its LIST of
 * index/ answers after `listDelayMs`. It records every request, and those sent after its close.
 */
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { KscError } from '../../src/errors.js';
import { FsStore } from '../../src/objstore/fs.js';
import type { ObjectInfo, ObjectStore } from '../../src/objstore/types.js';
import { StoreWrapper } from '../../src/objstore/wrapper.js';
import { Repository } from '../../src/repo/repository.js';

export class HungReads extends StoreWrapper {
  closed = false;
  readonly sent: string[] = [];
  readonly sentAfterClose: string[] = [];
  private readonly cut: (() => void)[] = [];
  constructor(
    inner: ObjectStore,
    private readonly listDelayMs = 300,
  ) {
    super(inner);
  }
  private record(what: string): void {
    this.sent.push(what);
    if (this.closed) this.sentAfterClose.push(what);
  }
  override getRange(key: string, offset: number, length: number): Promise<Buffer> {
    this.record(`GET ${key}`);
    if (!key.startsWith('index/')) return this.inner.getRange(key, offset, length);
    if (this.closed) return new Promise(() => undefined);
    return new Promise((_, reject) => this.cut.push(() => reject(new KscError('KSC_E_UNAVAILABLE', `${key}: connection destroyed by close`))));
  }
  override async get(key: string): Promise<Buffer> {
    this.record(`GET ${key}`);
    return this.inner.get(key);
  }
  override async *list(prefix: string): AsyncIterable<ObjectInfo> {
    this.record(`LIST ${prefix}`);
    if (prefix === 'index/') await sleep(this.listDelayMs);
    yield* this.inner.list(prefix);
  }
  override async close(): Promise<void> {
    this.closed = true;
    for (const c of this.cut) c();
    await this.inner.close();
  }
}

/** Makes an unencrypted repository with one index object at `path` (a new folder under `dir`), closed; returns the path. */
export async function plainRepoWithIndex(dir: string, name: string): Promise<string> {
  const path = join(dir, name);
  const made = await Repository.init(await FsStore.open(path, { create: true }), { encrypt: false });
  await made.putIndex([{ id: Buffer.alloc(16, 7), pack: 'ab'.repeat(16), offset: 16, length: 100, rawLength: 100 }]);
  await made.store.close();
  return path;
}
