/**
 * What the hostile tests of formats/repository.md §13.1 rule 2 (a config stripped of its encryption) share:
 * a disk whose bytes must never be stored in the clear, the hostile writer's stripping, and the search for
 * those bytes in a folder repository.
 */
import { readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { expect } from 'vitest';

export const MiB = 1024 * 1024;

/** Every file under `d`, recursively. */
export const walk = (d: string): string[] => readdirSync(d, { withFileTypes: true }).flatMap((e) => (e.isDirectory() ? walk(join(d, e.name)) : [join(d, e.name)]));

/** A compressible disk whose every 64 bytes carry a marker that must never be stored in the clear. */
export function disk(tag: string): Buffer {
  const b = Buffer.alloc(2 * MiB);
  for (let i = 0; i < b.length; i += 64) b.write(`MARKER-PLAINTEXT ${tag} ${i} `.padEnd(64, 'x'), i);
  return b;
}

/**
 * Rewrites the config of the encrypted repository `repo` as a version-1 one with the same id and sizes (what a
 * hostile writer would put); with `deleteKeys`, deletes keys/ too, so no key object names the repository.
 */
export function stripConfig(repo: string, opts: { deleteKeys?: boolean } = {}): void {
  const c = JSON.parse(readFileSync(join(repo, 'config'), 'utf8'));
  expect(c.features).toEqual(['encrypted']);
  delete c.features;
  delete c.encryption;
  c.version = 1;
  writeFileSync(join(repo, 'config'), JSON.stringify(c));
  if (opts.deleteKeys) rmSync(join(repo, 'keys'), { recursive: true, force: true });
}

/** The files of `repo` holding a marker of disk() in the clear. */
export const inTheClear = (repo: string): string[] => walk(repo).filter((f) => readFileSync(f).includes('MARKER-PLAINTEXT'));
