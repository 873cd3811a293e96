#!/usr/bin/env node
/**
 * Backup memory against disk and repository size (issue 5: "RSS under 300 MiB for any disk size"). Not a
 * race (memory has no peer here): each case runs in a child process and reports its peak RSS
 * (getrusage maxrss) and wall time.
 *
 *   node bench/memory.mjs [--disk-gib 256] [--index-m 8] [--cases exact,filter,forced]
 *
 * The disk is synthetic so that its size costs no storage: every 1 MiB chunk holds its own number in its
 * first 8 bytes and zeros after, so every chunk is distinct (all are stored) and hashing, not compression,
 * is the work. The repository's "large index" is made of index objects with random ids (about 40 bytes an
 * entry) naming one real pack, as a repository holding that many chunks would have.
 *   exact   a full backup into an empty repository (index in memory: 20 bytes an id)
 *   filter  the same disk into a repository whose index has --index-m million entries (Bloom filter, windows)
 *   forced  as filter, with the exact index forced (exactIds = Infinity): what the filter saves
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { randomBytes } from 'node:crypto';

const here = dirname(fileURLToPath(import.meta.url));
const dist = join(here, '..', 'dist');
const MiB = 1024 * 1024;

if (process.argv[2] === '--child') {
  const [, , , kind, repoDir, diskGiB] = process.argv;
  const { FsStore } = await import(join(dist, 'objstore/fs.js'));
  const { Repository } = await import(join(dist, 'repo/repository.js'));
  const { backupDevice } = await import(join(dist, 'engines/backup.js'));
  const { closePool } = await import(join(dist, 'compress/pool.js'));
  const size = Number(diskGiB) * 1024 * MiB;
  /** A read-only raw-like device whose chunk k is k (8 bytes) then zeros. */
  const dev = {
    name: `synthetic-${diskGiB}GiB`,
    format: 'raw',
    size,
    blockSize: MiB,
    readOnly: true,
    async readInto(offset, target) {
      target.fill(0);
      for (let at = 0; at < target.length; at += MiB) {
        const pos = offset + at;
        if (pos % MiB === 0) target.writeDoubleLE(pos / MiB + 1, at);
      }
    },
    async read(offset, length) {
      const b = Buffer.allocUnsafe(length);
      await this.readInto(offset, b);
      return b;
    },
    async extents(offset, length) {
      return [{ offset, length, state: 'data' }];
    },
    async write() {
      throw new Error('read-only');
    },
    async writeZeroes() {
      throw new Error('read-only');
    },
    async discard() {
      throw new Error('read-only');
    },
    async flush() {},
    async close() {},
  };
  const repo = await Repository.open(await FsStore.open(repoDir));
  const t0 = performance.now();
  const r = await backupDevice(dev, repo, { bitmap: null, ...(kind === 'forced' ? { exactIds: Infinity } : {}) });
  const ms = performance.now() - t0;
  await closePool();
  process.stdout.write(
    JSON.stringify({ kind, dedupe: r.dedupe, chunks: r.chunks, chunksNew: r.chunksNew, reread: r.chunksReread, ms: Math.round(ms), maxRssMiB: Math.round(process.resourceUsage().maxRSS / 1024) }) +
      '\n',
  );
  process.exit(0);
}

const { values } = parseArgs({ options: { 'disk-gib': { type: 'string', default: '256' }, 'index-m': { type: 'string', default: '8' }, cases: { type: 'string', default: 'exact,filter,forced' } } });
const diskGiB = Number(values['disk-gib']);
const indexEntries = Math.round(Number(values['index-m']) * 1e6);
const { FsStore } = await import(join(dist, 'objstore/fs.js'));
const { Repository } = await import(join(dist, 'repo/repository.js'));
const { encodeIndex } = await import(join(dist, 'repo/index-object.js'));

async function makeRepo(entries) {
  const dir = mkdtempSync(join(tmpdir(), 'kscinc-bench-mem-'));
  const repo = await Repository.init(await FsStore.open(dir, { create: true }));
  if (entries > 0) {
    // One small real pack for the entries to name, so the repository looks indexed (no orphans to adopt).
    const w = repo.packWriter();
    await w.add(randomBytes(16), Buffer.alloc(64, 1), 64);
    await w.flushIndex();
    const pack = w.packsWritten[0];
    const per = 1 << 20;
    for (let done = 0; done < entries; done += per) {
      const n = Math.min(per, entries - done);
      const ids = randomBytes(n * 16);
      await repo.store.put(
        `index/${randomBytes(16).toString('hex')}.idx`,
        encodeIndex({
          *[Symbol.iterator]() {
            for (let i = 0; i < n; i++) yield { id: ids.subarray(i * 16, i * 16 + 16), pack, offset: 16, length: 64, rawLength: 64 };
          },
        }),
      );
    }
  }
  return dir;
}

console.log(`kscinc memory bench: synthetic dense disk of ${diskGiB} GiB (${diskGiB * 1024} chunks of 1 MiB, all distinct), large index ${indexEntries} entries`);
const rows = [];
for (const kind of values.cases.split(',')) {
  const dir = await makeRepo(kind === 'exact' ? 0 : indexEntries);
  const r = spawnSync(process.execPath, [fileURLToPath(import.meta.url), '--child', kind, dir, String(diskGiB)], { encoding: 'utf8', env: { ...process.env, UV_THREADPOOL_SIZE: '16' } });
  rmSync(dir, { recursive: true, force: true });
  if (r.status !== 0) {
    console.log(`${kind}: failed\n${r.stderr}`);
    process.exitCode = 1;
    continue;
  }
  const row = JSON.parse(r.stdout.trim().split('\n').pop());
  rows.push(row);
  console.log(`${kind.padEnd(7)} dedupe ${row.dedupe.padEnd(6)} chunks ${row.chunks} new ${row.chunksNew} read twice ${row.reread}  ${(row.ms / 1000).toFixed(1)} s  max RSS ${row.maxRssMiB} MiB`);
}
