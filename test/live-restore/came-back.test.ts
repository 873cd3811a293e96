/**
 * A repository that comes back between a failed read and the look that judges it (formats/ksc_inc.md §4.2
 * rule 7, src/image/live-wait.ts): the read failed with "no object" because the folder was away, the config
 * object is there again when isUnreachable looks. That is not damage — a missing object is damage only in a
 * repository that was there before and after the try — so the read is tried once more and succeeds.
 * Session 20 saw it in test/live-restore/unreachable under load (the folder renamed back while a retry's
 * read was failing): 'KscError: backup … chunk 7 (…): every copy failed its check: …/wait-repo: no object
 * packs/9a/9a9a….pack'. Here the folder is renamed away and back around one real read of a real store.
 */
import { renameSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { isUnreachable, waitReachable } from '../../src/image/live-wait.js';
import { openStore } from '../../src/objstore/open.js';
import { CONFIG_KEY } from '../../src/repo/constants.js';
import { tempDir } from '../helpers/tmp.js';

describe('a repository that came back between a failed read and its check', () => {
  it('the read is tried again (not called damage); a missing object in a repository there all along still is', async () => {
    const dir = join(tempDir('kscinc-came-back-'), 'repo');
    const store = await openStore(dir, { create: true });
    try {
      await store.put(CONFIG_KEY, Buffer.from('config'));
      await store.put('packs/aa/aa01.pack', Buffer.from('0123456789'));
      let tries = 0;
      const opts = { timeoutMs: 10_000, closed: () => false, unreachable: (e: unknown) => isUnreachable(store, e), onRetry: () => undefined };
      const got = await waitReachable(
        'reading packs/aa/aa01.pack',
        async () => {
          if (++tries > 1) return store.getRange('packs/aa/aa01.pack', 2, 4);
          renameSync(dir, `${dir}.away`);
          try {
            return await store.getRange('packs/aa/aa01.pack', 2, 4);
          } finally {
            renameSync(`${dir}.away`, dir); // back before the failure is judged
          }
        },
        opts,
      );
      expect(got.toString()).toBe('2345');
      expect(tries).toBe(2);
      // The rig can fail: an object missing from a repository that stays there is damage, at once.
      let missing = 0;
      const e = await waitReachable('reading packs/bb/bb01.pack', () => (missing++, store.getRange('packs/bb/bb01.pack', 0, 4)), opts).catch((x: unknown) => x);
      expect(e).toMatchObject({ code: 'KSC_E_NOT_FOUND' });
      expect(missing, 'tries of the missing object: one immediate second try').toBe(2);
    } finally {
      await store.close();
    }
  });
});
