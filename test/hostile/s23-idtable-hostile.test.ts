/**
 * Hostile (session 23): the addon's index loops (native/kscinc_idtable.c, f92a86c) are fed bytes from the
 * repository. (1) Seeded hostile calls (odd-length and offset buffers, entries past the end, counts that lie,
 * n near 2^32, pack numbers without a pack, zero and duplicate ids, mismatched tables, odd word counts) in a
 * child process, against a JavaScript model, with the built addon and, where gcc has AddressSanitizer, with
 * an ASan+UBSan build of it: never a crash, never a report, the same answers. (2) A table whose count lies
 * (full, or told it is emptier than it is) must not make either loop probe for ever. (3) Every byte of a
 * valid index object flipped, its CRC made right again: checkIndex then addEntries with the addon and without
 * (KSCINC_NO_NATIVE=1) give the table addAt gives, or both refuse. (4) A batch refused part way leaves a table
 * whose size is what it holds.
 */
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { crc32 } from 'node:zlib';
import { afterEach, describe, expect, it } from 'vitest';
import { nativeAddonPath, nativeOps } from '../../src/io/native.js';
import { ChunkIndex } from '../../src/repo/chunkindex.js';
import { checkIndex, encodeIndex, type IndexEntry } from '../../src/repo/index-object.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { asanBuild, asanEnv } from './asan-addon.js';

const CHILD = fileURLToPath(new URL('./s23-idtable-child.mjs', import.meta.url));
const dir = tempDir('kscinc-s23-idtable-');
const before = process.env['KSCINC_NO_NATIVE'];
afterEach(() => {
  if (before === undefined) delete process.env['KSCINC_NO_NATIVE'];
  else process.env['KSCINC_NO_NATIVE'] = before;
});

function child(addon: string, seed: number, rounds: number, preload?: string): { status: number | null; signal: string | null; out: string; err: string } {
  const env = asanEnv(preload);
  const r = spawnSync(process.execPath, [CHILD, addon, String(seed), String(rounds)], { env, encoding: 'utf8', timeout: 40_000 });
  return { status: r.status, signal: r.signal, out: r.stdout, err: r.stderr };
}

const ways = [
  ['native', () => delete process.env['KSCINC_NO_NATIVE']],
  ['TypeScript', () => (process.env['KSCINC_NO_NATIVE'] = '1')],
] as const;

describe('s23: the index loops in C fed hostile input', () => {
  it('seeded hostile calls against a model: the built addon, and an ASan+UBSan build', () => {
    if (!nativeOps()?.idTableAdd) return void console.log('no addon: nothing to check');
    const seed = seedFor('test/hostile/s23-idtable-hostile.test.ts calls');
    const builds: [string, string, string | undefined][] = [['built', nativeAddonPath(), undefined]];
    const asan = asanBuild(dir);
    if (asan) builds.push(['asan', asan.path, asan.preload]);
    for (const [what, path, preload] of builds) {
      const r = child(path, seed, what === 'asan' ? 1500 : 4000, preload);
      console.log(`${what}: ${r.out.trim()} (exit ${r.status}, signal ${r.signal})`);
      expect({ status: r.status, signal: r.signal }, `${what} addon, seed ${seed}: the child died\n${r.err.slice(-3000)}`).toEqual({ status: 0, signal: null });
      const got = JSON.parse(r.out.trim().split('\n').pop()!) as { cases: number; mismatches: unknown[] };
      expect(got.cases, `${what}: calls made`).toBeGreaterThan(1000);
      expect(got.mismatches, `${what} addon, seed ${seed}: the addon and the model differ`).toEqual([]);
      expect(r.err, `${what}: sanitizer reports`).not.toMatch(/AddressSanitizer|runtime error/);
    }
  }, 60_000);

  it('a table whose count lies (full, or told it is emptier) does not make a loop probe for ever', () => {
    if (!nativeOps()?.idTableAdd) return void console.log('no addon: nothing to check');
    // Four slots, all taken (ids 1..4 in the first word), the count said to be 0: a new id has no empty slot.
    const script = `
      const a = require(${JSON.stringify(nativeAddonPath())});
      const keys = new Uint32Array(16), pack = new Uint32Array(4);
      for (let s = 0; s < 4; s++) { keys[s * 4] = s + 1; pack[s] = 1; }
      const e = new Uint8Array(40); e[0] = 9;
      const op = process.argv[1];
      if (op === 'add') console.log('add', a.idTableAdd(keys, pack, 1, new Uint32Array([0, 100]), e, 0, 1, new Uint32Array([1])));
      else console.log('hasAll', a.idTableHasAll(keys, pack, 1, new Uint32Array([9, 0, 0, 0])));`;
    for (const op of ['add', 'hasAll']) {
      const r = spawnSync(process.execPath, ['-e', script, op], { encoding: 'utf8', timeout: 10_000 });
      console.log(`full table, ${op}: exit ${r.status}, signal ${r.signal}: ${r.stdout.trim()}${r.stderr.trim().split('\n').pop() ?? ''}`);
      expect({ signal: r.signal, status: r.status }, `${op} on a full table whose count says 0: ended within 10 s`).toEqual({ signal: null, status: 0 });
      expect(r.stdout).toMatch(op === 'add' ? /^add 0$/m : /^hasAll false$/m);
    }
  }, 30_000);

  for (const [way, set] of ways) {
    it(`every byte of an index object flipped (CRC made right): addEntries gives what addAt gives, or checkIndex refuses (${way})`, () => {
      set();
      const seed = seedFor(`test/hostile/s23-idtable-hostile.test.ts flips ${way}`);
      const rng = new Rng(seed);
      const packs = [rng.bytes(16).toString('hex'), rng.bytes(16).toString('hex')];
      const base: IndexEntry[] = [];
      for (let i = 0; i < 6; i++)
        base.push({ id: i === 3 ? base[1]!.id : rng.bytes(16), pack: packs[i % 2]!, offset: rng.int(0, 1 << 30), length: rng.int(1, 1 << 20), rawLength: rng.int(1, 1 << 20) });
      const good = encodeIndex(base);
      let accepted = 0;
      for (let at = 0; at < good.length; at++) {
        if (at >= 28 && at < 32) continue; // the CRC itself
        const b = Buffer.from(good);
        b[at] ^= rng.int(1, 255);
        b.writeUInt32LE(crc32(b.subarray(32), crc32(b.subarray(0, 28))), 28);
        let d;
        try {
          d = checkIndex(b, 'flipped');
        } catch {
          continue;
        }
        accepted++;
        const bulk = new ChunkIndex({ locations: false });
        bulk.addEntries(b, d.entriesAt, d.entries, d.packTable);
        const one = new ChunkIndex({ locations: false });
        for (let j = 0; j < d.entries; j++) {
          const o = d.entriesAt + j * 40;
          one.addAt(b, o, d.packTable[b.readUInt32LE(o + 16)]!, 0, 0, 0);
        }
        const where = `byte ${at} flipped (seed ${seed})`;
        expect(bulk.size, where).toBe(one.size);
        for (let j = 0; j < d.entries; j++) {
          const id = b.subarray(d.entriesAt + j * 40, d.entriesAt + j * 40 + 16);
          expect(bulk.packName(bulk.slotOf(id)), where).toBe(one.packName(one.slotOf(id)));
        }
        const words = new Int32Array(new Uint8Array(Buffer.concat([Buffer.alloc(16), ...base.map((e) => e.id)])).buffer);
        expect(bulk.hasAllNonZero(words), where).toBe(one.hasAllNonZero(words));
      }
      console.log(`${way}: ${accepted} of ${good.length - 4} flipped objects passed checkIndex (seed ${seed})`);
      expect(accepted).toBeGreaterThan(100);
    });

    it(`a batch refused part way (a pack number without a pack) leaves a table whose size is what it holds (${way})`, () => {
      set();
      const rng = new Rng(seedFor(`test/hostile/s23-idtable-hostile.test.ts refused ${way}`));
      const idx = new ChunkIndex({ locations: false });
      const b = Buffer.alloc(40 * 10);
      for (let j = 0; j < 10; j++) rng.bytes(16).copy(b, j * 40);
      b.writeUInt32LE(5, 6 * 40 + 16); // entry 6 names pack 5 of 1
      expect(() => idx.addEntries(b, 0, 10, ['aa'.repeat(16)])).toThrow(RangeError);
      let present = 0;
      for (let j = 0; j < 10; j++) if (idx.hasAt(b, j * 40)) present++;
      expect({ size: idx.size, present }, 'size against the ids found').toEqual({ size: present, present });
    });
  }
});
