/**
 * A real QEMU guest (qemu-system-x86_64 with a Debian kernel and a busybox initramfs, test/helpers/guest.ts)
 * runs on a plain ksc_inc image served by `kscinc serve`: it reads data written before it booted, writes
 * patterns through virtio-blk with O_DIRECT and fsync, reads them back past its page cache, and powers
 * off. Afterwards the image is clean (`kscinc check`), and qemu-img compare finds it byte-identical to the
 * expected disk built on the host.
 */
import { readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { kscinc, run } from '../helpers/cli.js';
import { tempDir } from '../helpers/tmp.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { serve } from '../nbd/helpers.js';
import { guestPattern, MiB, runGuest, sha256 } from '../helpers/guest.js';

const dir = tempDir('kscinc-guest-');
const seed = seedFor('test/interop/guest.test.ts');
const rng = new Rng(seed);

function ok(r: { code: number; stdout: string; stderr: string }, what: string): string {
  expect(r.code, `${what}: ${r.stdout}${r.stderr}`).toBe(0);
  return r.stdout;
}

describe('a QEMU guest on a ksc_inc image served by kscinc serve', () => {
  const guests: { bootMs: number; totalMs: number }[] = [];
  afterAll(() => {
    // The figure CI logs show: how long one boot takes on this machine.
    for (const g of guests) console.log(`guest boot ${g.bootMs} ms, whole run ${g.totalMs} ms`);
  });

  it('reads what was there, writes, reads back; the image is clean and equals the expected disk', async () => {
    const size = 64 * MiB;
    const img = join(dir, 'vm.ksc');
    ok(kscinc(['create', img, '--size', '64M']), 'create');
    // Data written before the guest boots: 4 MiB of random bytes at 20 MiB.
    const pre = rng.bytes(4 * MiB);
    const preFile = join(dir, 'pre.bin');
    writeFileSync(preFile, pre);
    ok(kscinc(['write', img, '20M', '--from', preFile]), 'write before boot');

    const expected = Buffer.alloc(size);
    pre.copy(expected, 20 * MiB);
    const writes: [string, number, number][] = [
      ['A', 1, 8],
      ['B', 30, 3],
      ['C', 21, 1], // over part of the data written before boot
      ['D', 63, 1], // the last MiB
    ];
    for (const [tag, off, len] of writes) guestPattern(tag, off, len).copy(expected, off * MiB);

    const s = await serve([img, '--listen', '127.0.0.1:0']);
    let g;
    try {
      g = await runGuest({
        nbd: s.uris[0]!,
        name: 'plain-image',
        script: [
          'ksc_size',
          'ksc_sha pre 20 4',
          ...writes.map(([tag, off, len]) => `ksc_write ${tag} ${off} ${len}`),
          'sync; echo 3 >/proc/sys/vm/drop_caches',
          'ksc_sha a 1 8',
          'ksc_sha b 30 3',
          'ksc_sha pre2 20 4',
          'ksc_sha d 63 1',
          'ksc_sha hole 40 8',
        ].join('\n'),
      });
    } finally {
      expect(await s.stop(), `serve exit; stderr: ${s.stderr()}`).toBe(0);
    }
    guests.push(g);
    const r = g.results;
    const range = (off: number, len: number): string => sha256(expected.subarray(off * MiB, (off + len) * MiB));
    expect(r.size).toBe(String(size));
    expect(r.pre, `the guest reads the data written before it booted (seed ${seed})`).toBe(sha256(pre));
    expect(r.a).toBe(range(1, 8));
    expect(r.b).toBe(range(30, 3));
    expect(r.pre2, 'the C write replaced 1 MiB inside the earlier data').toBe(range(20, 4));
    expect(r.d).toBe(range(63, 1));
    expect(r.hole).toBe(sha256(Buffer.alloc(8 * MiB)));

    const check = JSON.parse(ok(kscinc(['check', img, '--json']), 'check'));
    expect(check, JSON.stringify(check)).toMatchObject({ ok: true, errors: [], warnings: [], dirty: false, leakedBytes: 0 });
    const out = join(dir, 'vm.raw');
    const want = join(dir, 'expected.raw');
    writeFileSync(want, expected);
    ok(kscinc(['convert', img, out, '-O', 'raw']), 'convert');
    const cmp = run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', want, out]);
    expect(cmp.stdout + cmp.stderr, `seed ${seed}`).toContain('Images are identical');
    expect(readFileSync(out).length).toBe(size);
  }, 300_000);

  it("a guest that cannot reach its disk fails the run with QEMU's reason, and its console log is kept", async () => {
    const err = await runGuest({ nbd: 'nbd://127.0.0.1:1/nothing', name: 'no-disk', script: 'ksc_size', timeoutMs: 60_000 }).then(
      () => null,
      (e: Error) => e,
    );
    expect(err?.message).toMatch(/guest no-disk: QEMU exited \(1\) without KSC-EXIT; console log kept in (\S+);/);
    const file = /console log kept in (\S+);/.exec(err!.message)![1]!;
    expect(readFileSync(file, 'utf8')).toMatch(/qemu stderr.*(Connection refused|Failed to connect)/);
    rmSync(file);
  });
});
