#!/usr/bin/env node
/**
 * Backup memory against disk and repository size (issue 5: "RSS under 300 MiB for any disk size"). Not a
 * race (memory has no peer here): each case runs in a child process and reports its peak RSS
 * (getrusage maxrss) and wall time.
 *
 *   node bench/memory.mjs [--disk-gib 256] [--index-m 8] [--cases exact,filter,forced] [--chunk-size 1M]
 *
 * The disk is synthetic so that its size costs no storage: every chunk (1 MiB, or --chunk-size: 64K … 4M,
 * formats/repository.md §3.2) holds its own number in its
 * first 8 bytes and zeros after, so every chunk is distinct (all are stored) and hashing, not compression,
 * is the work. The repository's "large index" is made of index objects with random ids (about 40 bytes an
 * entry) naming one real pack, as a repository holding that many chunks would have.
 *   exact   a full backup into an empty repository (index in memory: 20 bytes an id)
 *   filter  the same disk into a repository whose index has --index-m million entries (Bloom filter, windows)
 *   forced  as filter, with the exact index forced (exactIds = Infinity): what the filter saves
 *   restore-plan  no backup: what a restore of that disk holds per chunk before it reads a pack (the ids
 *           it needs, the index entries of those, the positions; src/engines/restore.ts loadPlan), built
 *           for every chunk of the disk with random ids, peak RSS against the same process without them
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
  const [, , , kind, repoDir, diskGiB, chunkArg] = process.argv;
  const C = Number(chunkArg);
  if (kind === 'restore-plan') await restorePlan(Number(diskGiB) * 1024 * 1024 * 1024, C);
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
    blockSize: C,
    readOnly: true,
    async readInto(offset, target) {
      target.fill(0);
      for (let at = 0; at < target.length; at += C) {
        const pos = offset + at;
        if (pos % C === 0) target.writeDoubleLE(pos / C + 1, at);
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
  if (repo.chunkSize !== C) throw new Error(`repository chunk size ${repo.chunkSize}, asked ${C}`);
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

/** The restore's per-chunk state for every chunk of a dense disk (see restore-plan above); exits. */
async function restorePlan(size, C) {
  const { ChunkIndex } = await import(join(dist, 'repo/chunkindex.js'));
  const n = Math.ceil(size / C);
  const base = process.resourceUsage().maxRSS;
  const t0 = performance.now();
  const block = randomBytes(16 * 65536);
  const fetch = [];
  for (let k = 0; k < n; k++) fetch.push(k);
  const needed = new ChunkIndex({ locations: false, expected: n });
  const idAt = (k) => {
    // distinct ids: a random block with the position written into it
    const at = (k & 65535) * 16;
    block.writeUInt32LE(k >>> 0, at);
    return at;
  };
  for (const k of fetch) needed.addAt(block, idAt(k), '', 0, 0, 0);
  const index = new ChunkIndex({ expected: n });
  const pack = randomBytes(16).toString('hex');
  for (const k of fetch) index.addAt(block, idAt(k), pack, k * 100, 100, C);
  const order = new Uint32Array(n);
  const ms = performance.now() - t0;
  process.stdout.write(
    JSON.stringify({
      kind: 'restore-plan',
      chunks: n,
      sizes: [needed.size, index.size, order.length],
      ms: Math.round(ms),
      maxRssMiB: Math.round(process.resourceUsage().maxRSS / 1024),
      baseRssMiB: Math.round(base / 1024),
    }) + '\n',
  );
  process.exit(0);
}

const { values } = parseArgs({
  options: {
    'disk-gib': { type: 'string', default: '256' },
    'index-m': { type: 'string', default: '8' },
    cases: { type: 'string', default: 'exact,filter,forced' },
    'chunk-size': { type: 'string', default: '1M' },
  },
});
const chunkSize = (() => {
  const m = /^(\d+)([KM])$/.exec(values['chunk-size']);
  if (!m) throw new Error(`--chunk-size ${values['chunk-size']}: expected 64K … 4M`);
  return Number(m[1]) * (m[2] === 'K' ? 1024 : MiB);
})();
const diskGiB = Number(values['disk-gib']);
const indexEntries = Math.round(Number(values['index-m']) * 1e6);
const { FsStore } = await import(join(dist, 'objstore/fs.js'));
const { Repository } = await import(join(dist, 'repo/repository.js'));
const { encodeIndex } = await import(join(dist, 'repo/index-object.js'));

async function makeRepo(entries) {
  const dir = mkdtempSync(join(tmpdir(), 'kscinc-bench-mem-'));
  const repo = await Repository.init(await FsStore.open(dir, { create: true }), { chunkSize, encrypt: false });
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

console.log(
  `kscinc memory bench: synthetic dense disk of ${diskGiB} GiB (${Math.ceil((diskGiB * 1024 * MiB) / chunkSize)} chunks of ${chunkSize / 1024} KiB, all distinct), large index ${indexEntries} entries`,
);
const rows = [];
for (const kind of values.cases.split(',')) {
  const dir = kind === 'restore-plan' ? '' : await makeRepo(kind === 'exact' ? 0 : indexEntries);
  const r = spawnSync(process.execPath, [fileURLToPath(import.meta.url), '--child', kind, dir, String(diskGiB), String(chunkSize)], {
    encoding: 'utf8',
    env: { ...process.env, UV_THREADPOOL_SIZE: '16' },
  });
  if (dir) rmSync(dir, { recursive: true, force: true });
  if (r.status !== 0) {
    console.log(`${kind}: failed\n${r.stderr}`);
    process.exitCode = 1;
    continue;
  }
  const row = JSON.parse(r.stdout.trim().split('\n').pop());
  rows.push(row);
  if (kind === 'restore-plan') {
    console.log(
      `restore-plan ${row.chunks} chunks: ${(row.ms / 1000).toFixed(1)} s  max RSS ${row.maxRssMiB} MiB (${row.baseRssMiB} MiB before: ${(((row.maxRssMiB - row.baseRssMiB) * MiB) / row.chunks).toFixed(0)} bytes a chunk)`,
    );
    continue;
  }
  console.log(`${kind.padEnd(7)} dedupe ${row.dedupe.padEnd(6)} chunks ${row.chunks} new ${row.chunksNew} read twice ${row.reread}  ${(row.ms / 1000).toFixed(1)} s  max RSS ${row.maxRssMiB} MiB`);
}
