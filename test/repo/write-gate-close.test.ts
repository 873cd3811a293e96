/**
 * Session 24: closing an unencrypted repository's store (its WriteGate) ends §13.1 rule 2's check — the
 * sealed-object probe that Repository.open starts beside its read of the config — whatever state it is in,
 * and sends none of its requests after the close. The folder store (HungReads) answers like a gateway that hangs
 * on reads of index objects: a request in flight when the store closes is cut (as closing the S3 store
 * destroys its connections), one sent after the close never answers (a new connection to the hung gateway,
 * which would hold the process for the S3 idle timeout). On the old code the gate's close waited for the
 * probe before closing the store: it never returned.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { describe, expect, it } from 'vitest';
import { FsStore } from '../../src/objstore/fs.js';
import { Repository } from '../../src/repo/repository.js';
import { tempDir } from '../helpers/tmp.js';
import { HungReads, plainRepoWithIndex } from './hung-reads.js';

const dir = tempDir('kscinc-gate-close-');
let n = 0;

/** An unencrypted repository with one index object, opened through HungReads. */
async function openHung(listDelayMs: number): Promise<{ repo: Repository; store: HungReads }> {
  const path = await plainRepoWithIndex(dir, `r${n++}`);
  const store = new HungReads(await FsStore.open(path), listDelayMs);
  return { repo: await Repository.open(store), store };
}

/** 'closed' when the close returned within `ms`, else 'hung'. */
async function closeWithin(repo: Repository, ms: number): Promise<string> {
  const t = sleep(ms).then(() => 'hung');
  return Promise.race([repo.store.close().then(() => 'closed'), t]);
}

describe("an unencrypted repository's store closes its sealed-object probe (session 24)", () => {
  it('the probe has its GET of an index object in flight: the close cuts it and returns', async () => {
    const { repo, store } = await openHung(0);
    for (let i = 0; i < 200 && !store.sent.some((s) => s.startsWith('GET index/')); i++) await sleep(10);
    expect(store.sent.filter((s) => s.startsWith('GET index/')).length, `the probe's GET is in flight (sent: ${store.sent.join(', ')})`).toBe(1);
    expect(await closeWithin(repo, 5000), 'the close of the gate, a GET of the probe hanging').toBe('closed');
    expect(store.sentAfterClose, 'requests sent after the close').toEqual([]);
  });

  it('the probe still waits for its LIST: the close returns and the probe sends no GET after it', async () => {
    const { repo, store } = await openHung(300);
    expect(store.sent, 'the LIST of index/ is sent, the GET not yet').toContain('LIST index/');
    expect(
      store.sent.some((s) => s.startsWith('GET index/')),
      'no GET yet',
    ).toBe(false);
    expect(await closeWithin(repo, 5000), 'the close of the gate, the LIST answering after it').toBe('closed');
    await sleep(400); // the LIST has answered by now
    expect(store.sentAfterClose, 'requests sent after the close').toEqual([]);
  });

  it('a change after the close is refused, not sent', async () => {
    const { repo, store } = await openHung(300);
    expect(await closeWithin(repo, 5000)).toBe('closed');
    await expect(repo.store.put('locks/x.lock', Buffer.from('{}'))).rejects.toMatchObject({ code: 'KSC_E_CLOSED' });
    expect(store.sentAfterClose).toEqual([]);
  });
  it('an open refused after the probe started (KSCINC_REQUIRE_ENCRYPTION) ends it: nothing is sent after the caller closes the store (the review of session 24)', async () => {
    const path = await plainRepoWithIndex(dir, `r${n++}`);
    const store = new HungReads(await FsStore.open(path), 300);
    const before = process.env['KSCINC_REQUIRE_ENCRYPTION'];
    process.env['KSCINC_REQUIRE_ENCRYPTION'] = '1';
    try {
      await expect(Repository.open(store)).rejects.toThrow(/encrypt/i);
    } finally {
      if (before === undefined) delete process.env['KSCINC_REQUIRE_ENCRYPTION'];
      else process.env['KSCINC_REQUIRE_ENCRYPTION'] = before;
    }
    await store.close();
    await sleep(500); // the LIST has answered by now: the probe would send its GET
    expect(store.sentAfterClose, 'requests sent after the close').toEqual([]);
  });
});
