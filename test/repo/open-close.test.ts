/**
 * Session 24: every command and engine that opens a repository closes the repository's store (closeRepo,
 * withOpenRepo in src/repo/open-close.ts), not the store it opened it on. An unencrypted repository's store
 * is a WriteGate whose close ends §13.1 rule 2's sealed-object probe; closing the store below it left the
 * probe free to send its read of an index object after the close (on S3: a new connection, which a gateway
 * that hangs holds for the idle timeout). The store here answers like such a gateway (HungReads, as in
 * write-gate-close.test.ts): its LIST of index/ answers after 300 ms, its reads of index objects never do
 * once it is closed. openStore gives it to the code under test, which otherwise runs as in production.
 */
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { Command } from 'commander';
import { describe, expect, it, vi } from 'vitest';
import { rmSync } from 'node:fs';
import { FsStore } from '../../src/objstore/fs.js';
import type { ObjectStore } from '../../src/objstore/types.js';
import { registerKeyCommands } from '../../src/cli/key-commands.js';
import { registerRepoCommands } from '../../src/cli/repo-commands.js';
import { repairConfig } from '../../src/repo/repair.js';
import { BackupBacking } from '../../src/image/repobacking.js';
import { tempDir } from '../helpers/tmp.js';
import { HungReads, plainRepoWithIndex } from './hung-reads.js';

/** The store openStore hands out next (null: the real one). */
const next = vi.hoisted(() => ({ store: null as ObjectStore | null }));
vi.mock('../../src/objstore/open.js', async (importOriginal) => {
  const orig = await importOriginal<typeof import('../../src/objstore/open.js')>();
  return {
    ...orig,
    openStore: async (...args: Parameters<typeof orig.openStore>): Promise<ObjectStore> => {
      const s = next.store;
      next.store = null;
      return s ?? orig.openStore(...args);
    },
  };
});

const dir = tempDir('kscinc-open-close-');
let n = 0;

/** An unencrypted repository with one index object; openStore gives the next open of it through HungReads. */
async function hungRepo(): Promise<{ path: string; store: HungReads }> {
  const path = await plainRepoWithIndex(dir, `r${n++}`);
  const store = new HungReads(await FsStore.open(path));
  next.store = store;
  return { path, store };
}

describe('an opened repository is closed through its own store (session 24)', () => {
  it('kscinc key list on an unencrypted repository (withKeys): refused, and the probe sends nothing after the close', async () => {
    const { path, store } = await hungRepo();
    const program = new Command().exitOverride();
    registerKeyCommands(program);
    await expect(program.parseAsync(['key', 'list', '--repo', path], { from: 'user' })).rejects.toThrow(/not encrypted/);
    expect(store.closed, 'the store was closed').toBe(true);
    await sleep(500); // the LIST has answered by now: the probe would send its GET
    expect(store.sentAfterClose, 'requests sent after the close').toEqual([]);
  });

  it('BackupBacking.open of a backup the repository does not hold: refused, and the probe sends nothing after the close', async () => {
    const { path, store } = await hungRepo();
    const ref = { disk: Buffer.alloc(16, 1), root: Buffer.alloc(16, 2), chunkSize: 65536, id: '20260101T000000Z-0123abcd' };
    await expect(BackupBacking.open(join(dir, 'img'), path, ref, 1 << 20, { hold: false })).rejects.toThrow();
    expect(store.closed, 'the store was closed').toBe(true);
    await sleep(500);
    expect(store.sentAfterClose, 'requests sent after the close').toEqual([]);
  });

  it('kscinc repo repair of an unencrypted repository: the read-back of the new config ends its probe, which sends nothing after the close', async () => {
    const { path, store } = await hungRepo();
    rmSync(join(path, 'config'));
    const program = new Command().exitOverride();
    registerRepoCommands(program);
    const out = vi.spyOn(process.stdout, 'write').mockImplementation(() => true);
    try {
      await program.parseAsync(['repo', 'repair', path], { from: 'user' });
    } finally {
      out.mockRestore();
    }
    expect(store.closed, 'the store was closed').toBe(true);
    expect(store.sent, 'the config was written and read back by an open (its probe LISTs index/)').toContain('LIST index/');
    await sleep(500); // the LIST has answered by now: the probe would send its GET
    expect(store.sentAfterClose, 'requests sent after the close').toEqual([]);
  });

  it('repairConfig on a store its caller closes: nothing of the read-back open is sent after that close', async () => {
    const { path, store } = await hungRepo();
    next.store = null;
    rmSync(join(path, 'config'));
    const r = await repairConfig(store);
    expect(r.config.version, 'an unencrypted config was rebuilt').toBe(1);
    await store.close();
    await sleep(500);
    expect(store.sentAfterClose, 'requests sent after the close').toEqual([]);
  });
});
