/**
 * The commit's sync order on a local folder, cut at every step: a real `kscinc backup` child (a private copy
 * of dist/, as the kill tests run it) makes a full backup and then an incremental into a folder repository
 * with 64 KiB chunks and 4 MiB packs (several packs, new pack folders), each under `strace -ff`. For every
 * moment of each trace (each system call's start and end), sync-trace.ts judges what a power cut (or a kill)
 * there leaves, and every rule of formats/repository.md §9 the commit relies on must hold: an index object
 * that may exist names only durable packs (rule 1), a manifest that may exist lists only chunks of durable
 * index objects (rule 2), no object is renamed before its bytes are durable, and the success the writer
 * reports comes after its manifest is durable (rule 3). The same checker is shown to fail on the real trace
 * with a folder sync, a part's fsync or the order of two renames taken away (so the test can fail).
 *
 * Needs strace (a real peer: it records the calls the kernel saw, whatever the writer believes it did).
 */
import { execFileSync, spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createImage, openKsc } from '../../src/image/open.js';
import { decodeIndex } from '../../src/repo/index-object.js';
import { closePool } from '../../src/compress/pool.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { snapshotCli } from '../backup/helpers/dist.js';
import { KiB, MiB, newRepo, openRepo } from '../backup/helpers/fixtures.js';
import { RepoTrace, checkCommitOrder, readTrace, type Call, type RepoContents } from './sync-trace.js';

const dir = tempDir('kscinc-commit-order-');
const seed = seedFor('test/objstore/fs-commit-order.test.ts');
const C = 64 * KiB;
const SIZE = 16 * MiB;
let cli = '';
const image = join(dir, 'disk.ksc');
const repoDir = join(dir, 'repo');
afterAll(() => closePool());

/** Runs `kscinc backup` under strace; resolves with the trace prefix and the reported backup id. */
async function tracedBackup(name: string): Promise<{ prefix: string; id: string; full: boolean }> {
  const traces = mkdtempSync(join(dir, `trace-${name}-`));
  const prefix = join(traces, 't');
  const args = ['-ff', '-ttt', '-T', '-y', '-s', '4096', '-e', 'trace=fsync,fdatasync,rename,renameat,renameat2,mkdir,mkdirat,write,writev,pwrite64,pwritev,pwritev2', '-o', prefix];
  // UV_USE_IO_URING=0: every file operation is a system call strace sees.
  const child = spawn('strace', [...args, process.execPath, cli, 'backup', image, '--repo', repoDir, '--json'], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, UV_USE_IO_URING: '0' } });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const code = await new Promise<number | null>((res) => child.on('close', res));
  if (code !== 0) throw new Error(`kscinc backup under strace exited ${code}: ${stderr}`);
  const r = JSON.parse(stdout) as { id: string; full: boolean };
  return { prefix, id: r.id, full: r.full };
}

/** The index objects' packs and ids and the manifests' chunk ids, read back through the repository. */
async function contentsOf(): Promise<RepoContents> {
  const repo = await openRepo(repoDir);
  const index = new Map<string, { packs: Set<string>; ids: Set<string> }>();
  for (const id of await repo.listIndexObjects()) {
    const entries = decodeIndex(await repo.readIndexObject(id), id);
    index.set(`index/${id}.idx`, { packs: new Set(entries.map((e) => e.pack)), ids: new Set(entries.map((e) => e.id.toString('hex'))) });
  }
  const manifests = new Map<string, Set<string>>();
  for (const id of await repo.listBackupIds()) {
    const m = await repo.readManifest(id);
    const ids = new Set<string>();
    m.ids.forEachNonZero((_k, chunk) => void ids.add(chunk.toString('hex')));
    m.ids.store?.close();
    manifests.set(`manifests/${id}.manifest`, ids);
  }
  return { index, manifests };
}

const runs: { name: string; calls: Call[]; manifest: string; full: boolean }[] = [];
let contents: RepoContents;

beforeAll(async () => {
  execFileSync('strace', ['-V'], { stdio: 'pipe' }); // a clear failure when strace is missing
  mkdirSync(join(dir, 'cli'));
  cli = await snapshotCli(join(dir, 'cli'));
  const rng = new Rng(seed);
  await createImage(image, { size: SIZE });
  const img = await openKsc(image, { write: true });
  try {
    await img.addBitmap('backup', { enabled: true });
    await img.write(0, rng.bytes(12 * MiB)); // incompressible: three packs of 4 MiB
    await img.flush();
  } finally {
    await img.close();
  }
  await newRepo(repoDir, { chunkSize: C, packSize: 4 * MiB });
  const full = await tracedBackup('full');
  const img2 = await openKsc(image, { write: true });
  try {
    // 80 chunks rewritten (5 MiB: two packs), some past the data written before.
    for (let i = 0; i < 80; i++) await img2.write(rng.int(0, SIZE / C - 1) * C, rng.bytes(C));
    await img2.flush();
  } finally {
    await img2.close();
  }
  const inc = await tracedBackup('incremental');
  for (const [name, r] of [
    ['full', full],
    ['incremental', inc],
  ] as const) {
    runs.push({ name, calls: readTrace(r.prefix), manifest: `manifests/${r.id}.manifest`, full: r.full });
  }
  contents = await contentsOf();
}, 240_000);

describe('the commit sync order of a folder repository, cut at every step', () => {
  it('holds §9 rules 1–3 at every step of a full and an incremental backup', () => {
    expect(runs.map((r) => r.full)).toEqual([true, false]);
    for (const r of runs) {
      const trace = new RepoTrace(repoDir, r.calls);
      // The trace saw the puts: at least one pack, an index object and the manifest.
      const keys = [...trace.renames.keys()];
      expect(keys.filter((k) => k.startsWith('packs/')).length, `${r.name}: packs renamed`).toBeGreaterThan(0);
      expect(keys.filter((k) => k.startsWith('index/')).length, `${r.name}: index objects renamed`).toBeGreaterThan(0);
      expect(keys, `${r.name}: manifest renamed`).toContain(r.manifest);
      // New pack folders were made (their names synced in packs/, side by side with the parts' writes).
      if (r.full) expect([...trace.mkdirs.keys()].filter((d) => d.startsWith(join(repoDir, 'packs/'))).length, 'pack folders made').toBeGreaterThan(0);
      const { violations, steps } = checkCommitOrder(trace, contents, r.manifest);
      console.log(`seed ${seed}: ${r.name}: ${steps} steps judged, ${keys.length} renames, violations: ${violations.length}`);
      expect(violations, `${r.name} (seed ${seed})`).toEqual([]);
    }
  });

  it('fails when a pack folder or its name is not synced, a part is not synced, the index is renamed before its packs, or the manifest is not synced', () => {
    const r = runs[1]!;
    const base = new RepoTrace(repoDir, r.calls);
    const packKeys = [...base.renames.keys()].filter((k) => k.startsWith('packs/'));
    const indexKey = [...base.renames.keys()].find((k) => k.startsWith('index/'))!;
    const isSyncOf = (c: Call, path: string): boolean => /sync$/.test(c.name) && c.args.startsWith(`${c.args.split('<')[0]}<${path}>`);
    // (1) No fsync of the pack folders: the index object names packs whose names may be lost.
    const folders = new Set(packKeys.map((k) => join(repoDir, k, '..')));
    const noFolderSync = r.calls.filter((c) => ![...folders].some((f) => isSyncOf(c, f)));
    expect(noFolderSync.length).toBeLessThan(r.calls.length);
    expect(checkCommitOrder(new RepoTrace(repoDir, noFolderSync), contents, r.manifest).violations.join('\n')).toMatch(/rule 1/);
    // (2) The index object's part never synced: it may be renamed torn.
    const part = base.renames.get(indexKey)!.part;
    const noPartSync = r.calls.filter((c) => !isSyncOf(c, part));
    expect(checkCommitOrder(new RepoTrace(repoDir, noPartSync), contents, r.manifest).violations.join('\n')).toMatch(/renamed before its bytes were durable/);
    // (3) The index object renamed right after the first pack's rename was issued (before any folder sync).
    const firstPack = Math.min(...packKeys.map((k) => base.renames.get(k)!.start));
    const early = r.calls.map((c) => (/^rename/.test(c.name) && c.args.includes(`"${join(repoDir, indexKey)}"`) ? { ...c, start: firstPack + 1, end: firstPack + 2 } : c));
    expect(checkCommitOrder(new RepoTrace(repoDir, early), contents, r.manifest).violations.join('\n')).toMatch(/rule 1/);
    // (4) The new pack folders' names never synced in packs/ (the full backup made them).
    const f = runs[0]!;
    const noPacksSync = f.calls.filter((c) => !isSyncOf(c, join(repoDir, 'packs')));
    expect(noPacksSync.length).toBeLessThan(f.calls.length);
    expect(checkCommitOrder(new RepoTrace(repoDir, noPacksSync), contents, f.manifest).violations.join('\n')).toMatch(/rule 1/);
    // (5) The manifest's folder never synced: the success is reported before the manifest is durable.
    const noManifestSync = r.calls.filter((c) => !isSyncOf(c, join(repoDir, 'manifests')));
    expect(checkCommitOrder(new RepoTrace(repoDir, noManifestSync), contents, r.manifest).violations.join('\n')).toMatch(/rule 3/);
  });
});
