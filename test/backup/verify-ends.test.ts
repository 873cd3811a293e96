/**
 * Verify reads pack headers and footers (formats/repository.md §5.1, §5.3, §9.4). Before, only the blobs
 * were read, so a flipped footer (what an index rebuild and a resuming writer rely on) passed. Each kind of
 * damage on a fresh copy of one repository: a byte of the header, of the footer entries, of the footer
 * tail, and a footer re-sealed with a wrong blob offset (its CRCs right, but disagreeing with the index).
 * Verify must name the pack and no backup (the blobs are intact), the CLI must exit 3, and the backup must
 * still restore exactly.
 */
import { cpSync, openSync, readSync, writeSync, closeSync, writeFileSync, readFileSync, rmSync, statSync } from 'node:fs';
import { crc32 } from 'node:zlib';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { backupDevice } from '../../src/engines/backup.js';
import { restoreBackup } from '../../src/engines/restore.js';
import { verifyRepo } from '../../src/engines/verify.js';
import { openImage } from '../../src/image/open.js';
import { packKey } from '../../src/repo/repository.js';
import { closePool } from '../../src/compress/pool.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { kscinc } from '../helpers/cli.js';
import { MiB, newRepo, openRepo } from './helpers/fixtures.js';

const dir = tempDir('kscinc-verify-ends-');
const seed = seedFor('test/backup/verify-ends.test.ts');
afterAll(() => closePool());

let pristine: string;
let data: Buffer;
let backup: string;
let pack: string;

beforeAll(async () => {
  const rng = new Rng(seed);
  pristine = join(dir, 'pristine');
  await newRepo(pristine, { encrypt: false }); // the cases damage the plain pack layout (§5)
  data = rng.bytes(6 * MiB);
  const file = join(dir, 'disk.raw');
  writeFileSync(file, data);
  const dev = await openImage(file);
  try {
    backup = (await backupDevice(dev, await openRepo(pristine), { bitmap: null })).id;
  } finally {
    await dev.close();
  }
  const packs = [...(await (await openRepo(pristine)).listPacks()).keys()];
  pack = packs[rng.int(0, packs.length - 1)]!;
});

function patch(file: string, at: number, fn: (b: Buffer) => void, length = 1): void {
  const fd = openSync(file, 'r+');
  const b = Buffer.alloc(length);
  readSync(fd, b, 0, length, at);
  fn(b);
  writeSync(fd, b, 0, length, at);
  closeSync(fd);
}

const cases: [string, RegExp, (file: string, size: number, count: number) => void][] = [
  ['a byte of the header magic', /header magic/, (f) => patch(f, 3, (b) => (b[0] ^= 1))],
  ['a byte of a footer entry', /footer entries checksum/, (f, size, n) => patch(f, size - 32 - 48 * n + 20, (b) => (b[0] ^= 0x10))],
  ['a byte of the footer tail', /footer (tail checksum|magic)/, (f, size) => patch(f, size - 5, (b) => (b[0] ^= 0x80))],
  [
    'a footer re-sealed with a wrong blob offset',
    /footer does not list chunk/,
    (f, size, n) => {
      const entriesAt = size - 32 - 48 * n;
      patch(
        f,
        entriesAt,
        (b) => {
          b.writeUInt32LE(b.readUInt32LE(16) + 1, 16); // entry 0's offset, one byte off
          b.writeUInt32LE(crc32(b.subarray(0, 48 * n)), 48 * n + 4);
          b.writeUInt32LE(crc32(b.subarray(48 * n, 48 * n + 20)), 48 * n + 20);
        },
        48 * n + 32,
      );
    },
  ],
];

describe('verify checks pack headers and footers', () => {
  for (const [what, problem, damage] of cases) {
    it(what, async () => {
      const repoDir = join(dir, what.replace(/\W+/g, '-'));
      cpSync(pristine, repoDir, { recursive: true });
      const file = join(repoDir, packKey(pack));
      const size = statSync(file).size;
      const tail = Buffer.alloc(4);
      const fd = openSync(file, 'r');
      readSync(fd, tail, 0, 4, size - 32);
      closeSync(fd);
      damage(file, size, tail.readUInt32LE(0));
      const repo = await openRepo(repoDir);
      const v = await verifyRepo(repo);
      expect(v.ok).toBe(false);
      expect(v.damage.map((d) => d.object)).toEqual([repo.objName(packKey(pack))]);
      expect(v.damage[0]!.problem).toMatch(problem);
      expect(v.damage[0]!.backups).toEqual([]);
      const one = await verifyRepo(repo, { backup });
      expect(one.damage.map((d) => d.object)).toEqual([repo.objName(packKey(pack))]);
      const cli = kscinc(['verify', '--repo', repoDir]);
      expect(cli.code).toBe(3);
      expect(cli.stdout).toContain(`DAMAGED ${repo.objName(packKey(pack))}`);
      // The blobs are intact: the backup restores from the index's locations.
      const out = join(dir, 'out.raw');
      await restoreBackup(repo, backup, out);
      expect(readFileSync(out).equals(data)).toBe(true);
      rmSync(out);
      rmSync(repoDir, { recursive: true });
    });
  }
});
