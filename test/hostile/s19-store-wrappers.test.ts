/**
 * Session 19, hostile: session 18 made an adopted orphan pack durable under its key before a backup indexes
 * it (ObjectStore.syncObject, 6637aca; formats/repository.md §9 rule 6), and the commit write its index and
 * manifest parts beside the last pack (putAfter). Both are optional methods of the store, called as
 * `store.syncObject?.(…)`: a wrapper openStore puts around the folder store — the request trace
 * (KSCINC_STORE_TRACE=1 or a subscriber) or a crash test's fault plan (KSC_FAULT_AFTER) — that does not pass
 * syncObject on makes the adoption silently skip the sync. Folder syncs are recorded by a mock.
 */
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { tempDir } from '../helpers/tmp.js';

vi.mock('../../src/io/durable.js', async (original) => (await import('../helpers/synced-dirs.js')).recordSyncDirs(original));
const { synced } = await import('../helpers/synced-dirs.js');

const { MiB, newRepo } = await import('../backup/helpers/fixtures.js');
const { adoptOrphans } = await import('../../src/engines/backup/dedupe.js');
const { packKey, Repository } = await import('../../src/repo/repository.js');
const { openStore } = await import('../../src/objstore/open.js');
const { onStoreRequest } = await import('../../src/objstore/trace.js');
const { setFaultPlan } = await import('../../src/io/fault.js');
type Dedupe = Parameters<typeof adoptOrphans>[1];

let undo: (() => void) | null = null;
afterEach(() => {
  undo?.();
  undo = null;
});

/** A repository folder with one orphan pack (uploaded, never indexed); returns its root and the pack id. */
async function withOrphan(): Promise<{ root: string; pack: string }> {
  const root = join(tempDir('kscinc-s19-wrappers-'), 'repo');
  const first = await newRepo(root, { chunkSize: 64 * 1024, packSize: 4 * MiB, encrypt: false });
  const w = first.packWriter();
  for (let i = 0; i < 4; i++) await w.add(randomBytes(16), randomBytes(64 * 1024), 64 * 1024);
  await w.finish();
  return { root, pack: w.packsWritten[0]! };
}

/** Adopts `pack` through a store openStore makes now; the folders synced meanwhile. */
async function adoptThroughOpenStore(root: string, pack: string): Promise<string[]> {
  const repo = await Repository.open(await openStore(root));
  synced.length = 0;
  const dedupe = { hasPack: () => false, add: () => undefined } as unknown as Dedupe;
  expect((await adoptOrphans(repo, dedupe, [pack])).length).toBe(4);
  return [...synced];
}

describe('store wrappers pass the folder store durability methods on (session 19, hostile)', () => {
  it('traced (a subscriber, as KSCINC_STORE_TRACE=1): adopting an orphan pack syncs its folder and packs/', async () => {
    const { root, pack } = await withOrphan();
    undo = onStoreRequest(() => undefined);
    const s = await adoptThroughOpenStore(root, pack);
    console.log(`traced: folders synced while adopting: ${s.map((d) => d.slice(root.length) || '/').join(', ') || 'none'}`);
    expect(s, "the pack's folder (its name) was synced").toContain(join(root, packKey(pack), '..'));
    expect(s).toContain(join(root, 'packs'));
  });

  it('under a fault plan (crash tests): adopting an orphan pack syncs its folder and packs/', async () => {
    const { root, pack } = await withOrphan();
    setFaultPlan({ after: 1000, action: 'throw' });
    undo = () => setFaultPlan(null);
    const s = await adoptThroughOpenStore(root, pack);
    expect(s, "the pack's folder (its name) was synced").toContain(join(root, packKey(pack), '..'));
    expect(s).toContain(join(root, 'packs'));
  });

  it("each wrapper keeps the folder store's optional methods (a wrapped run takes production's path)", async () => {
    const { root } = await withOrphan();
    for (const [what, on] of [
      ['traced', () => onStoreRequest(() => undefined)],
      ['fault plan', () => (setFaultPlan({ after: 1000, action: 'throw' }), () => setFaultPlan(null))],
    ] as const) {
      undo = on();
      const store = await openStore(root);
      for (const m of ['syncObject', 'putAfter', 'listKeys'] as const) expect(typeof store[m], `${what}: ${m}`).toBe('function');
      undo();
      undo = null;
    }
  });
});
