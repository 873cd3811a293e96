/**
 * Race 7: restore of the full backup of the raw test image (race 5's, or one made here untimed) to a new
 * file, against `cp --sparse=always IMAGE OUT` (which copies only the data extents and keeps zero runs as
 * holes, as our restore does). Ours: `kscinc restore latest OUT --repo DIR` to raw and with `-O kscinc`,
 * and restoreBackup() in-process to raw. Every pass starts from a dropped page cache after both sides'
 * inputs (the pack files and the image) were read once (hostWarm: this VM's host cache would otherwise
 * favour whichever was written last), and ends when the output is durable (fdatasync of the output inside
 * the timing for every side). Measure: MB/s of disk size over wall time. Goal: ours/cp ≥ 0.7×.
 * The restored files are compared with the image afterwards (untimed).
 *
 * With S3 settings in the environment, also restores the S3 backup of race 5 (or one made here) to raw.
 *
 * The rows above measure the engines, on equal terms: inputs warm in the host's cache, Node and the CLI's
 * files warm (timedPass runs `backup --help` after the drop), only the output fdatasynced. A user waits for
 * more (issue 19): a fourth row times `kscinc restore … && sync` against `cp --sparse=always … && sync`
 * right after the drop, with nothing warmed on either side (cold Node start-up, cold CLI files, `sync`).
 * bench/restore-user.mjs measures that view alone, with CPU and bytes.
 */
import { execFileSync } from 'node:child_process';
import { promises as fsp } from 'node:fs';
import { join, relative } from 'node:path';
import { restoreBackup } from '../../dist/engines/restore.js';
import { openImage } from '../../dist/image/open.js';
import { Repository } from '../../dist/repo/repository.js';
import { MiB, dropCaches, foreignSince, foreignUsage, hostWarm, median, retrying, rmf, row, timed, verifyDevice, waitQuiet } from '../lib/common.mjs';
import { allocatedBytes, cliEnv, filesUnder, libBackup, openRepoStore, procRun, recyclePool, removeS3Repo, runCliJson, s3Settings, timedPass } from './backup.mjs';

export async function restoreRace(ctx) {
  const { src, size, work, reps, cli, log } = ctx;
  let repoDir = ctx.backupRepo;
  if (!repoDir) {
    repoDir = join(work, 'rs-repo');
    log('  (making a full backup of the image to restore from, untimed)');
    await fsp.rm(repoDir, { recursive: true, force: true });
    await libBackup(src, repoDir);
  }
  let s3 = ctx.s3Repo ?? null;
  const s3s = s3 ? s3.settings : s3Settings();
  if (!s3s) log('  S3: skipped (no KSCINC_S3_ENDPOINT or S3_ENDPOINT with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in the environment; scripts/ceph-rgw.sh start prints them)');
  else if (!s3) {
    s3 = { location: `s3://${s3s.bucket}/${s3s.run}/restore`, env: s3s.env, settings: s3s };
    log(`  (S3: making a full backup into ${s3.location}, untimed)`);
    await libBackup(src, s3.location, { s3env: s3.env });
  }
  const out = {
    cliRaw: join(work, 'rs-cli.raw'),
    cliKsc: join(work, 'rs-cli.ksc'),
    libRaw: join(work, 'rs-lib.raw'),
    cp: join(work, 'rs-cp.raw'),
    s3Raw: join(work, 'rs-s3.raw'),
    userRaw: join(work, 'rs-user.raw'),
    userCp: join(work, 'rs-user-cp.raw'),
  };
  const stats = { cliRaw: [], cliKsc: [], libRaw: [], s3Raw: [] };
  const cliRestore =
    (o, extra = [], env = cliEnv(), loc = repoDir) =>
    () =>
      runCliJson(cli, ['restore', 'latest', o, '--repo', loc, ...extra], env);
  const sides = {
    cliRaw: cliRestore(out.cliRaw),
    cliKsc: cliRestore(out.cliKsc, ['-O', 'kscinc']),
    libRaw: async () => {
      const store = await openRepoStore(repoDir, null, false);
      try {
        return await restoreBackup(await Repository.open(store), 'latest', out.libRaw, { format: 'raw' });
      } finally {
        await store.close();
      }
    },
    cp: () => procRun('cp', ['--sparse=always', src, out.cp]),
    userRaw: cliRestore(out.userRaw),
    userCp: () => procRun('cp', ['--sparse=always', src, out.userCp]),
  };
  /** As a user waits: nothing warmed after the drop, and `sync` (not an fdatasync of the output) inside the time. */
  const userSide = new Set(['userRaw', 'userCp']);
  const userPass = async (fn) => {
    dropCaches();
    await waitQuiet();
    const bg0 = foreignUsage();
    let r;
    const ms = await timed(async () => {
      r = await fn();
      execFileSync('sync');
    });
    return { ms, ...foreignSince(bg0), out: r };
  };
  if (s3) sides.s3Raw = cliRestore(out.s3Raw, [], cliEnv(s3.env), s3.location);
  const packs = await filesUnder(join(repoDir, 'packs'));
  const names = Object.keys(sides);
  const res = Object.fromEntries(names.map((n) => [n, []]));
  for (let rep = 0; rep < reps; rep++) {
    const order = names.map((_, i) => names[(i + rep) % names.length]);
    await hostWarm(src, ...packs);
    for (const n of order) {
      res[n].push(
        await retrying(async () => {
          await rmf(out[n]);
          const r = userSide.has(n) ? await userPass(sides[n]) : await timedPass(ctx, sides[n], [out[n]]);
          if (n === 'libRaw') await recyclePool();
          if (stats[n] && r.out) stats[n].push(r.out);
          return r;
        }),
      );
    }
    log(`  restore rep ${rep + 1}/${reps}: ${names.map((n) => `${n} ${res[n][rep].ms.toFixed(0)} ms`).join(', ')}`);
  }

  // Untimed: every restored file reads back as the source.
  for (const n of names.filter((x) => x !== 'cp' && x !== 'userCp')) {
    const dev = await openImage(out[n]);
    try {
      await verifyDevice(dev, ctx.source(), out[n]);
    } finally {
      await dev.close();
    }
  }
  const alloc = {};
  for (const n of names) alloc[n] = await allocatedBytes(out[n]);
  await rmf(...Object.values(out));
  if (!ctx.backupRepo) await fsp.rm(repoDir, { recursive: true, force: true });
  if (s3) await removeS3Repo(s3.location, s3.env).catch((e) => log(`  S3 clean-up failed: ${e.message}`));

  const mibs = (b) => `${(b / MiB).toFixed(0)} MiB`;
  const measure = `MB/s of disk size (${(size / 2 ** 30).toFixed(0)} GiB virtual, ${(ctx.dataBytes / MiB).toFixed(0)} MiB data) into a new file, cold (page cache dropped; inputs pre-read once), until durable`;
  const cpLabel = 'cp --sparse=always IMAGE OUT + fdatasync';
  const st = stats.cliRaw.at(-1);
  const extra = (n) => ({
    'allocated ours / cp': `${mibs(alloc[n])} / ${mibs(alloc.cp)}`,
    ...(stats[n]?.length ? { 'engine durationMs': median(stats[n].map((x) => x.durationMs)).toFixed(0) } : {}),
  });
  const cliName = relative(process.cwd(), cli);
  const rows = [
    row({
      race: 7,
      name: 'restore to raw (CLI) vs cp --sparse=always',
      bytes: size,
      measure,
      ours: res.cliRaw,
      peer: res.cp,
      oursLabel: `kscinc restore latest OUT --repo DIR (${cliName}, a process, incl. Node start-up); fetched ${mibs(st.bytesFetched)}, wrote ${mibs(st.bytesWritten)}`,
      peerLabel: cpLabel,
      goal: { min: 0.7 },
      extra: extra('cliRaw'),
    }),
    row({
      race: 7,
      name: 'restore to ksc_inc (CLI -O kscinc) vs cp',
      bytes: size,
      measure,
      ours: res.cliKsc,
      peer: res.cp,
      oursLabel: 'kscinc restore latest OUT --repo DIR -O kscinc',
      peerLabel: cpLabel,
      goal: { min: 0.7 },
      extra: extra('cliKsc'),
    }),
    row({
      race: 7,
      name: 'restore to raw (library) vs cp',
      bytes: size,
      measure,
      ours: res.libRaw,
      peer: res.cp,
      oursLabel: 'restoreBackup(folder repository, "latest", new raw file) in-process (warm worker pool), incl. opening the repository',
      peerLabel: cpLabel,
      goal: { min: 0.7 },
      extra: extra('libRaw'),
    }),
    row({
      race: 7,
      name: 'restore to raw as a user waits (cold CLI, && sync) vs cp && sync',
      bytes: size,
      measure: `MB/s of disk size into a new file from a dropped page cache with nothing warmed (Node, the CLI's files), until \`sync\` returns`,
      ours: res.userRaw,
      peer: res.userCp,
      oursLabel: 'kscinc restore latest OUT --repo DIR && sync',
      peerLabel: 'cp --sparse=always IMAGE OUT && sync',
      goal: { min: 0.9 },
      extra: { 'allocated ours / cp': `${mibs(alloc.userRaw)} / ${mibs(alloc.userCp)}` },
    }),
  ];
  if (s3) {
    rows.push(
      row({
        race: 7,
        name: 'restore to raw from S3 (CLI) vs cp [S3]',
        bytes: size,
        measure: `${measure}; repository s3://${s3s.bucket}/… at ${s3s.endpoint}`,
        ours: res.s3Raw,
        peer: res.cp,
        oursLabel: 'kscinc restore latest OUT --repo s3://BUCKET/PREFIX',
        peerLabel: cpLabel,
        extra: extra('s3Raw'),
      }),
    );
  }
  return rows;
}
