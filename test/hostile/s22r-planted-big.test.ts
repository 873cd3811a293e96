/**
 * Hostile round, session 22: a writer plants one huge object (a sparse 512 MiB file) where the repository
 * keeps small JSON objects that every client reads whole: a lock (read by every backup, restore, prune),
 * a key object (tried by every open of an encrypted repository), a live-restore reference (read by prune,
 * which keeps the backup its key names).
 * formats/repository.md §12 rule 1: a decoder never allocates from an unchecked length; the planted object
 * must be judged damaged without being read, not held in memory (it was: 1.6 GB of RSS for a 1.5 GB lock).
 * The client's peak RSS (process.resourceUsage, written at exit by a preload) stays far below the object.
 */
import { describe, expect, it } from 'vitest';
import { existsSync, mkdirSync, readFileSync, truncateSync, unlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { kscinc } from '../helpers/cli.js';
import { tempDir } from '../helpers/tmp.js';
import { Rng, seedFor } from '../helpers/rng.js';

const dir = tempDir('kscinc-s22r-planted-');
const seed = seedFor('test/hostile/s22r-planted-big.test.ts');
const rng = new Rng(seed);
const MiB = 1024 * 1024;
const BIG = 512 * MiB;
/** Peak RSS allowed to a CLI run: its own ~100 MB and the 2 MiB disk, far below the planted object. */
const RSS_LIMIT = 320 * MiB;

const preload = join(dir, 'maxrss.cjs');
writeFileSync(preload, "process.on('exit', () => { if (process.env.MAXRSS_OUT) require('fs').writeFileSync(process.env.MAXRSS_OUT, String(process.resourceUsage().maxRSS * 1024)); });\n");

/** Runs the CLI with the preload; returns its result and peak RSS in bytes. */
function measured(args: string[]): { code: number; out: string; rss: number } {
  const file = join(dir, `rss-${rng.u32()}`);
  const r = kscinc(args, { env: { NODE_OPTIONS: `--require ${preload}`, MAXRSS_OUT: file } });
  return { code: r.code, out: r.stdout + r.stderr, rss: Number(readFileSync(file, 'utf8')) };
}

function plant(file: string): void {
  writeFileSync(file, '');
  truncateSync(file, BIG);
}

describe('a huge object planted among the small ones', () => {
  const repo = join(dir, 'repo');
  const img = join(dir, 'disk.raw');
  let id = '';

  /** With `f` planted, a backup succeeds and peaks below the limit; `f` is removed after. */
  function backupWithPlanted(f: string): void {
    plant(f);
    try {
      const m = measured(['backup', img, '--repo', repo, '--no-bitmap']);
      expect(m.code, m.out).toBe(0);
      expect(m.rss, `peak RSS ${(m.rss / MiB).toFixed(0)} MiB`).toBeLessThan(RSS_LIMIT);
    } finally {
      unlinkSync(f);
    }
  }

  it('setup: an encrypted repository with one backup; a backup peaks far below the limit', () => {
    expect(kscinc(['repo', 'init', repo, '--encrypt']).code).toBe(0);
    writeFileSync(img, rng.bytes(2 * MiB));
    const b = kscinc(['backup', img, '--repo', repo, '--no-bitmap', '--json']);
    expect(b.code, b.stderr).toBe(0);
    id = JSON.parse(b.stdout).id as string;
    const m = measured(['backup', img, '--repo', repo, '--no-bitmap']);
    expect(m.code, m.out).toBe(0);
    console.log(`seed ${seed}: a backup with nothing planted peaks at ${(m.rss / MiB).toFixed(0)} MiB`);
    expect(m.rss).toBeLessThan(RSS_LIMIT);
  });

  it('a 512 MiB lock: backup works, named or ignored, not read', () => {
    mkdirSync(join(repo, 'locks'), { recursive: true });
    backupWithPlanted(join(repo, 'locks', `${'0'.repeat(32)}.lock`));
  });

  it('a 512 MiB key object: the password still opens the repository through the real key object', () => {
    backupWithPlanted(join(repo, 'keys', `${'0'.repeat(32)}.key`));
  });

  it('a 512 MiB live-restore reference (unreadable, its key names a backup): prune keeps that backup, without reading it', () => {
    const d = join(repo, 'refs', 'live', id);
    mkdirSync(d, { recursive: true });
    const f = join(d, `${'0'.repeat(32)}.ref`);
    plant(f);
    try {
      const m = measured(['prune', '--repo', repo, '--keep-last', '1', '--grace', '0']);
      expect(m.rss, `peak RSS ${(m.rss / MiB).toFixed(0)} MiB: ${m.out}`).toBeLessThan(RSS_LIMIT);
      expect(m.code, m.out).toBe(0);
      expect(existsSync(join(repo, 'manifests', `${id}.manifest`)), 'the backup the reference names is kept').toBe(true);
    } finally {
      unlinkSync(f);
    }
  });
});
