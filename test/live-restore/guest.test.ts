/**
 * Issue 18 with a real QEMU guest (test/helpers/guest.ts): a disk is backed up to a repository in a local
 * folder and, in a second case, in Ceph RGW; `kscinc restore latest vm.ksc --repo R --live`; `kscinc serve
 * vm.ksc`; the guest reads ranges not local yet (checksums equal the backup's), writes (one write
 * covering part of a chunk never read, one over a range it read, one in the disk's zero area), reads back
 * past its page cache and powers off. Then `kscinc pull vm.ksc` (unless the server pulled it all in the
 * background already) leaves an image without the repository, equal to the backup plus the
 * guest's writes, byte for byte (qemu-img compare), `kscinc check` clean, and the next backup is
 * incremental against the one restored, reading exactly the chunks the guest wrote.
 *
 * A third case stops the S3 server mid-read (issue 18): the image is served with `--no-pull` from a private
 * radosgw of the same Ceph cluster (so stopping it disturbs no other test file), the gateway is SIGSTOPped
 * for 10 s while the guest reads chunks not yet local, then SIGCONTed: the guest's read waits through the
 * outage (no EIO: its script stops at the first failed read) and returns the backup's bytes
 * (formats/ksc_inc.md §4.2 rule 7), and the server logs no error.
 */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { kscinc, run } from '../helpers/cli.js';
import { tempDir } from '../helpers/tmp.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { spawnServe } from '../helpers/serve.js';
import { freshBucket, privateGateway, s3Config, s3Env } from '../helpers/s3.js';
import { guestPattern, killGuests, MiB, runGuest, sha256, startGuest } from '../helpers/guest.js';
import { closePool } from '../../src/compress/pool.js';

const dir = tempDir('kscinc-live-guest-');
const seed = seedFor('test/live-restore/guest.test.ts');
const rng = new Rng(seed);
afterAll(() => {
  killGuests();
  return closePool();
});

function ok(r: { code: number; stdout: string; stderr: string }, what: string): string {
  expect(r.code, `${what}: ${r.stdout}${r.stderr}`).toBe(0);
  return r.stdout;
}

const SIZE = 48 * MiB;
/** Guest writes: [tag, offset MiB, length MiB]. */
const WRITES: [string, number, number][] = [
  ['W', 5, 1], // never read before: the rest of its chunk still comes from the backup
  ['X', 12, 2], // over a range the guest read first
  ['Y', 44, 1], // the zero tail of the disk
];

async function scenario(name: string, repo: string, env: Record<string, string>): Promise<void> {
  const kenv = { ...env };
  // The source disk: 40 MiB of random data, then 8 MiB never written; backed up with a bitmap, so the live
  // image's next backup can be incremental.
  const src = join(dir, `${name}-src.ksc`);
  ok(kscinc(['create', src, '--size', String(SIZE)]), 'create source');
  const data = rng.bytes(40 * MiB);
  const dataFile = join(dir, `${name}-data.bin`);
  writeFileSync(dataFile, data);
  ok(kscinc(['write', src, '0', '--from', dataFile]), 'write source');
  const first = JSON.parse(ok(kscinc(['backup', src, '--repo', repo, '--create-bitmap', '--json'], { env: kenv }), 'backup'));
  const backup = Buffer.alloc(SIZE);
  data.copy(backup);

  const vm = join(dir, `${name}-vm.ksc`);
  const live = JSON.parse(ok(kscinc(['restore', 'latest', vm, '--repo', repo, '--live', '--json'], { env: kenv }), 'restore --live'));
  expect(live.backup).toBe(first.id);

  const expected = Buffer.from(backup);
  for (const [tag, off, len] of WRITES) guestPattern(tag, off, len).copy(expected, off * MiB);
  const s = spawnServe([vm, '--listen', '127.0.0.1:0'], { env: kenv, timeoutMs: 30_000 });
  let g;
  try {
    const [uri] = await s.uris;
    g = await runGuest({
      nbd: uri!,
      name: `live-${name}`,
      script: [
        'ksc_size',
        'ksc_sha r0 0 4',
        'ksc_sha r8 8 8',
        'ksc_sha r36 36 12',
        ...WRITES.map(([tag, off, len]) => `ksc_write ${tag} ${off} ${len}`),
        'sync; echo 3 >/proc/sys/vm/drop_caches',
        'ksc_sha w4 4 4',
        'ksc_sha x12 12 2',
        'ksc_sha y40 40 8',
      ].join('\n'),
    });
  } finally {
    if (s.proc.exitCode === null) s.proc.kill('SIGTERM');
    expect(await s.exited, `serve exit; stderr: ${s.stderr()}`).toBe(0);
  }
  const r = g.results;
  const before = (off: number, len: number): string => sha256(backup.subarray(off * MiB, (off + len) * MiB));
  const after = (off: number, len: number): string => sha256(expected.subarray(off * MiB, (off + len) * MiB));
  expect(r.size).toBe(String(SIZE));
  expect(r.r0, `guest reads of not-yet-local data equal the backup (seed ${seed})`).toBe(before(0, 4));
  expect(r.r8).toBe(before(8, 8));
  expect(r.r36, 'data and the zero tail').toBe(before(36, 12));
  expect(r.w4, 'a partial-chunk write next to backup data').toBe(after(4, 4));
  expect(r.x12).toBe(after(12, 2));
  expect(r.y40).toBe(after(40, 8));

  // A server that pulls in the background may have finished (and dropped the backup) while the guest ran;
  // otherwise the CLI pull does it now. Either way the image ends without the repository.
  const info = (): { backingChain: { file: string }[] } => JSON.parse(ok(kscinc(['info', vm, '--json'], { env: kenv }), 'info'));
  if (info().backingChain.some((b) => b.file.startsWith('backup '))) {
    const pulled = JSON.parse(ok(kscinc(['pull', vm, '--json'], { env: kenv }), 'pull'));
    expect(pulled.detached).toBe(true);
    expect(pulled.referenceLeft).toBeNull();
  }
  expect(info().backingChain).toEqual([]);
  const locks = JSON.parse(ok(kscinc(['repo', 'locks', repo, '--json'], { env: kenv }), 'repo locks'));
  expect(
    locks.filter((l: { kind: string }) => l.kind === 'live-restore'),
    'the live restore reference is gone',
  ).toEqual([]);
  expect(JSON.parse(ok(kscinc(['check', vm, '--json']), 'check'))).toMatchObject({ ok: true, errors: [], warnings: [], dirty: false, leakedBytes: 0 });
  const out = join(dir, `${name}-vm.raw`);
  const want = join(dir, `${name}-expected.raw`);
  writeFileSync(want, expected);
  ok(kscinc(['convert', vm, out, '-O', 'raw']), 'convert');
  const cmp = run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', want, out]);
  expect(cmp.stdout + cmp.stderr, `after pull: the backup plus the guest's writes (seed ${seed})`).toContain('Images are identical');

  // The next backup reads only the chunks the guest wrote (the pull's fills are not guest writes).
  const chunk = SIZE / first.chunks;
  const touched = new Set<number>();
  for (const [, off, len] of WRITES) for (let b = off * MiB; b < (off + len) * MiB; b += chunk) touched.add(Math.floor(b / chunk));
  const next = JSON.parse(ok(kscinc(['backup', vm, '--repo', repo, '--json'], { env: kenv }), 'backup of the live-restored image'));
  expect(next.full, JSON.stringify(next)).toBe(false);
  expect(next.parent).toBe(first.id);
  expect(next.chunksDirty, JSON.stringify(next)).toBe(touched.size);
  const restored = join(dir, `${name}-next.raw`);
  ok(kscinc(['restore', next.id, restored, '--repo', repo], { env: kenv }), 'restore of the next backup');
  const cmp2 = run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', want, restored]);
  expect(cmp2.stdout + cmp2.stderr, 'the incremental backup restores to the same disk').toContain('Images are identical');
}

describe('live restore under a real QEMU guest', () => {
  it('from a repository in a local folder: the guest reads the backup, writes; after pull the image is backup + writes; next backup incremental', async () => {
    await scenario('local', join(dir, 'repo'), {});
  }, 400_000);

  it('from a repository in Ceph RGW: the same', async () => {
    const env = s3Env(await s3Config()) as Record<string, string>;
    await scenario('s3', `s3://${freshBucket('guest')}/vm`, env);
  }, 600_000);

  it('from Ceph RGW stopped for 10 s mid-read: the guest waits, then reads the backup; the server logs no error', async () => {
    const OUTAGE_MS = 10_000;
    const gw = await privateGateway();
    try {
      const env = s3Env(gw.config) as Record<string, string>;
      const repo = `s3://${freshBucket('outage')}/vm`;
      const size = 16 * MiB;
      const data = rng.bytes(size);
      const src = join(dir, 'outage-src.raw');
      writeFileSync(src, data);
      ok(kscinc(['backup', src, '--repo', repo, '--no-bitmap'], { env }), 'backup to S3');
      const vm = join(dir, 'outage-vm.ksc');
      ok(kscinc(['restore', 'latest', vm, '--repo', repo, '--live'], { env }), 'restore --live');
      // --no-pull and no readahead: nothing fetches the chunks before the guest asks for them, so the read
      // below meets the outage with every chunk of its range still remote (readahead's window, up to 32 MiB,
      // would fetch this whole 16 MiB disk behind the first read).
      const s = spawnServe([vm, '--listen', '127.0.0.1:0', '--no-pull'], { env: { ...env, KSCINC_LIVE_READAHEAD: '0' }, timeoutMs: 30_000 });
      let readMs = -1;
      let stillReading = false;
      let r: Record<string, string> = {};
      try {
        const [uri] = await s.uris;
        const g = await startGuest({
          nbd: uri!,
          name: 'live-s3-outage',
          script: [
            'ksc_sha a 0 4', // not local yet: fetched while the gateway runs
            'ksc_wait go',
            't0=$(ksc_ms)',
            'ksc_sha b 4 12', // not local yet: issued while the gateway is stopped
            'ksc_result bms $(($(ksc_ms) - t0))',
          ].join('\n'),
        });
        await g.waitFor(/^KSC-WAIT go/, 180_000);
        expect(g.log(), 'the first read finished before the outage').toMatch(/^KSC-RESULT a /m);
        const stoppedAt = Date.now();
        gw.signal('SIGSTOP');
        try {
          g.send('go');
          await new Promise((res) => setTimeout(res, OUTAGE_MS));
          stillReading = !/^KSC-RESULT b /m.test(g.log()) && g.proc.exitCode === null;
        } finally {
          gw.signal('SIGCONT');
        }
        const res = await g.result();
        r = res.results;
        readMs = Number(r.bms);
        console.log(`s3 outage: gateway stopped ${Date.now() - stoppedAt} ms before the guest finished; guest read of 12 MiB took ${readMs} ms (guest clock)`);
      } finally {
        gw.signal('SIGCONT');
        if (s.proc.exitCode === null) s.proc.kill('SIGTERM');
        expect(await s.exited, `serve exit; stderr: ${s.stderr()}`).toBe(0);
      }
      expect(stillReading, 'the read was still waiting when the gateway was continued').toBe(true);
      // The guest issues the read a moment after the SIGSTOP (it first reads the console line): allow 1 s.
      expect(readMs, 'the read in progress waited through the outage').toBeGreaterThanOrEqual(OUTAGE_MS - 1000);
      expect(r.a, `before the outage (seed ${seed})`).toBe(sha256(data.subarray(0, 4 * MiB)));
      expect(r.b, `read through the outage equals the backup (seed ${seed})`).toBe(sha256(data.subarray(4 * MiB, 16 * MiB)));
      expect(s.stderr(), 'the server logged nothing worse than waiting').not.toMatch(/error|KSC_E_|EIO|fail|warn/i);
    } finally {
      gw.signal('SIGCONT');
      await gw.close();
    }
  }, 600_000);
});
