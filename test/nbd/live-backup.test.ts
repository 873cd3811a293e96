/**
 * Backup of a live image served over NBD: `kscinc backup IMAGE` finds the running `kscinc serve` holding
 * the image (its control socket) and the server runs the backup while qemu-io keeps writing. Checks: the
 * backups are incremental, a backup taken during writes is a point in time per block (old or new data,
 * never anything else), and the next backup catches every write made during the previous one (its restore
 * equals the image read back over NBD).
 */
import { describe, expect, it } from 'vitest';
import { spawn } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { kscinc, run } from '../helpers/cli.js';
import { tempDir } from '../helpers/tmp.js';
import { serve } from './helpers.js';
import { DEFAULT_CHUNK } from '../../src/repo/constants.js';

const MIB = 1024 * 1024;

function backup(image: string, repo: string): Record<string, unknown> {
  const r = kscinc(['backup', image, '--repo', repo, '--json']);
  expect(r.code, r.stderr).toBe(0);
  return JSON.parse(r.stdout) as Record<string, unknown>;
}

describe('live backup through kscinc serve', () => {
  it('backs up a served image while qemu-io writes, and loses no write from tracking', async () => {
    const dir = tempDir();
    const base = join(dir, 'base.raw');
    const data = Buffer.alloc(32 * MIB);
    for (let i = 0; i < data.length; i += 4096) data.fill((i / 4096) % 251, i, i + 4096);
    writeFileSync(base, data);
    const img = join(dir, 'vm.ksc');
    const repo = join(dir, 'repo');
    expect(kscinc(['create', img, '--backing', base]).code).toBe(0);
    const srv = await serve([img, '--listen', '127.0.0.1:0']);
    const uri = srv.uris[0]!;
    try {
      expect(run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x11 0 4M', uri]).code).toBe(0);
      // The image is locked by the server: the CLI must go through it, not fail.
      const b1 = backup(img, repo);
      expect(b1.full).toBe(true);
      expect(run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x22 8M 2M', uri]).code).toBe(0);
      const b2 = backup(img, repo);
      expect(b2.full).toBe(false);
      expect(b2.chunksDirty).toBe((2 * MIB) / DEFAULT_CHUNK); // the 2 MiB written, in chunks of the default size
      expect(b2.parent).toBe(b1.id);

      // Writes of 0x33 over 16M…24M run while the third backup runs.
      const cmds = Array.from({ length: 64 }, (_, i) => ['-c', `write -P 0x33 ${16 * MIB + i * 128 * 1024} 128k`]).flat();
      const writer = spawn('qemu-io', ['-f', 'raw', ...cmds, uri], { stdio: 'ignore' });
      const writerDone = new Promise<number | null>((r) => writer.once('exit', r));
      const b3 = backup(img, repo);
      expect(await writerDone).toBe(0);
      expect(b3.full).toBe(false);
      const r3 = join(dir, 'r3.raw');
      expect(kscinc(['restore', String(b3.id), r3, '--repo', repo]).code).toBe(0);
      const got3 = readFileSync(r3);
      // Per 128 KiB write: the backup holds the old bytes or the new ones, never a mix inside one write.
      for (let o = 16 * MIB; o < 24 * MIB; o += 128 * 1024) {
        const piece = got3.subarray(o, o + 128 * 1024);
        const isNew = piece.equals(Buffer.alloc(piece.length, 0x33));
        const isOld = piece.equals(data.subarray(o, o + 128 * 1024));
        expect(isNew || isOld, `block at ${o} is neither old nor new`).toBe(true);
      }
      // Outside the written ranges the third backup equals the second point.
      expect(got3.subarray(0, 4 * MIB).equals(Buffer.alloc(4 * MIB, 0x11))).toBe(true);
      expect(got3.subarray(8 * MIB, 10 * MIB).equals(Buffer.alloc(2 * MIB, 0x22))).toBe(true);

      // Nothing written during backup 3 dropped out of tracking: backup 4 restores to the current image.
      const b4 = backup(img, repo);
      expect(b4.full).toBe(false);
      const r4 = join(dir, 'r4.raw');
      expect(kscinc(['restore', 'latest', r4, '--repo', repo]).code).toBe(0);
      const cur = join(dir, 'cur.raw');
      expect(run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri, cur]).code).toBe(0);
      const cmp = run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', r4, cur]);
      expect(cmp.code, cmp.stdout + cmp.stderr).toBe(0);
      expect(
        readFileSync(cur)
          .subarray(16 * MIB, 24 * MIB)
          .equals(Buffer.alloc(8 * MIB, 0x33)),
      ).toBe(true);
    } finally {
      expect(await srv.stop()).toBe(0);
    }
    expect(srv.stderr()).toMatch(/backup .* done/);
  });
});
