/**
 * A backup adopts packs an interrupted writer uploaded and never indexed (§9 rule 6). That writer may have
 * been killed after the pack's rename and before its folder was synced: the name may not be durable. The
 * adopting backup must make it durable before its own index object names the pack (§9 rule 1), or a power
 * cut after the commit could leave a manifest naming a missing pack. Folder syncs are recorded by a mock.
 */
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { describe, expect, it, vi } from 'vitest';
import { tempDir } from '../helpers/tmp.js';

vi.mock('../../src/io/durable.js', async (original) => (await import('../helpers/synced-dirs.js')).recordSyncDirs(original));
const { synced } = await import('../helpers/synced-dirs.js');

const { MiB, newRepo, openRepo } = await import('./helpers/fixtures.js');
const { adoptOrphans } = await import('../../src/engines/backup/dedupe.js');
const { packKey } = await import('../../src/repo/repository.js');
type Dedupe = Parameters<typeof adoptOrphans>[1];

describe('adopting an orphan pack', () => {
  it('syncs the pack and its folder before the adopting backup can index it', async () => {
    const root = join(tempDir('kscinc-adopt-'), 'repo');
    const first = await newRepo(root, { chunkSize: 64 * 1024, packSize: 4 * MiB, encrypt: false });
    const w = first.packWriter();
    for (let i = 0; i < 8; i++) await w.add(randomBytes(16), randomBytes(64 * 1024), 64 * 1024);
    await w.finish(); // uploaded, never indexed: an orphan, as a writer killed before its index leaves it
    const [pack] = w.packsWritten;
    expect(pack).toBeDefined();
    // The next backup, in another process (a fresh store): what it syncs from here on.
    const repo = await openRepo(root);
    synced.length = 0;
    const added: unknown[] = [];
    const dedupe = { hasPack: () => false, add: (e: unknown) => void added.push(e) } as unknown as Dedupe;
    const adopted = await adoptOrphans(repo, dedupe, [pack!]);
    expect(adopted.length).toBe(8);
    const folder = join(root, packKey(pack!), '..');
    console.log(`folders synced while adopting ${pack}: ${synced.map((d) => d.slice(root.length) || '/').join(', ') || 'none'}`);
    expect(synced, "the pack's folder (its name) was synced").toContain(folder);
    expect(synced, "and packs/ (the folder's name)").toContain(join(root, 'packs'));
  });
});
