/**
 * Session 23 (review of the merged diff): a live-restore image opened for writing puts its reference
 * refs/live/… (formats/repository.md §8.1) — a change of the repository, which §13.1 rule 2 says waits for
 * the check that an unencrypted config was not stripped of its encryption. The backing put it (and deleted it
 * on a pull) through the raw store, past the repository's WriteGate, so under a stripped config whose first
 * index object is sealed the open wrote a reference before being refused. It must write none.
 */
import { readdirSync, rmSync, writeFileSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { kscinc } from '../helpers/cli.js';
import { openKsc } from '../../src/image/open.js';
import { tempDir } from '../helpers/tmp.js';
import { stripConfig, walk } from './s22r-downgrade-helpers.js';

describe('a live-restore image opened for writing under a stripped config (§13.1 rule 2)', () => {
  it('is refused and writes no refs/live/ object', async () => {
    const dir = tempDir('kscinc-s23-downgrade-liveref-');
    const repo = join(dir, 'repo');
    const img = join(dir, 'a.raw');
    const live = join(dir, 'live.ksc');
    writeFileSync(img, Buffer.alloc(1024 * 1024, 0x5a));
    expect(kscinc(['repo', 'init', repo, '--encrypt']).code).toBe(0);
    const b = kscinc(['backup', img, '--repo', repo, '--no-bitmap']);
    expect(b.code, b.stderr).toBe(0);
    const r = kscinc(['restore', 'latest', live, '--repo', repo, '--live']);
    expect(r.code, r.stderr).toBe(0);
    expect(walk(join(repo, 'refs')).length, 'the live restore put its reference').toBeGreaterThan(0);
    rmSync(join(repo, 'refs'), { recursive: true, force: true });
    stripConfig(repo, { deleteKeys: true });
    rmSync(join(repo, 'locks'), { recursive: true, force: true });
    expect(readdirSync(join(repo, 'index')).length).toBe(1);
    await expect(openKsc(live, { write: true }).then((i) => i.close())).rejects.toMatchObject({ message: expect.stringMatching(/sealed|stripped/) });
    const refs = existsSync(join(repo, 'refs')) ? walk(join(repo, 'refs')) : [];
    expect(refs, 'no refs/live/ object written').toEqual([]);
  });
});
