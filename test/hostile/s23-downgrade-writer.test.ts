/**
 * Session 23: §13.1 rule 2's check of an unencrypted config (formats/repository.md) runs beside the work of
 * the open, and only the repository's changes wait for it (src/objstore/write-gate.ts). Under a config
 * stripped of its encryption, keys/ deleted, whose first index object is sealed, the open itself goes
 * through, so this pins that a writer still changes NOTHING: not a pack, an index object, a manifest, nor
 * even a lock object; and that the reads a reader makes refuse the sealed objects.
 */
import { describe, expect, it } from 'vitest';
import { readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { kscinc } from '../helpers/cli.js';
import { openStore } from '../../src/objstore/open.js';
import { Repository } from '../../src/repo/repository.js';
import { tempDir } from '../helpers/tmp.js';
import { stripConfig, walk } from './s22r-downgrade-helpers.js';

const dir = tempDir('kscinc-s23-downgrade-writer-');
/** Every file of the repository (locks and temporary parts too), with its bytes. */
const everything = (repo: string): Map<string, string> => new Map(walk(repo).map((f) => [f, readFileSync(f).toString('base64')]));

/** An encrypted repository with one backup, its config then stripped of its encryption and keys/ deleted. */
function stripped(name: string): { repo: string; img: string } {
  const repo = join(dir, name);
  const img = join(dir, `${name}.raw`);
  writeFileSync(img, Buffer.alloc(1024 * 1024, 0x5a));
  expect(kscinc(['repo', 'init', repo, '--encrypt']).code).toBe(0);
  const b = kscinc(['backup', img, '--repo', repo, '--no-bitmap']);
  expect(b.code, b.stderr).toBe(0);
  stripConfig(repo, { deleteKeys: true });
  rmSync(join(repo, 'locks'), { recursive: true, force: true });
  expect(walk(join(repo, 'index')).length).toBe(1);
  return { repo, img };
}

describe('a writer under a stripped config whose first index object is sealed (§13.1 rule 2)', () => {
  it('kscinc backup and prune write nothing, no lock object either', () => {
    const { repo, img } = stripped('cli');
    const before = everything(repo);
    for (const args of [
      ['backup', img, '--repo', repo, '--no-bitmap'],
      ['prune', '--repo', repo, '--keep-last', '1', '--grace', '0'],
    ]) {
      const r = kscinc(args);
      expect(r.code, `${args[0]}: ${r.stdout}${r.stderr}`).not.toBe(0);
      expect(r.stderr, args[0]).toMatch(/sealed.*stripped of its encryption/);
      expect(everything(repo), args[0]).toEqual(before);
    }
  });

  it('the library: the open goes through; a lock, a put and a delete are refused (KSC_E_AUTH) before any is sent; reads refuse the sealed index object', async () => {
    const { repo } = stripped('lib');
    const before = everything(repo);
    const store = await openStore(repo);
    try {
      const r = await Repository.open(store);
      expect(r.encrypted).toBe(false);
      const auth = { code: 'KSC_E_AUTH', message: expect.stringMatching(/sealed.*stripped of its encryption/) };
      await expect(r.lock('exclusive', 'test writer')).rejects.toMatchObject(auth);
      await expect(r.store.put('gc/mark', Buffer.from('x'))).rejects.toMatchObject(auth);
      await expect(r.store.delete(readdirSync(join(repo, 'index')).map((f) => `index/${f}`)[0]!)).rejects.toMatchObject(auth);
      await expect(r.loadIndex()).rejects.toMatchObject({ code: 'KSC_E_AUTH', message: expect.stringMatching(/sealed/) });
      expect(everything(repo)).toEqual(before);
    } finally {
      await store.close();
    }
  });
});
