#!/usr/bin/env node
/**
 * Live restore's first read in one process, two builds side by side (issue 18, session 13): liveRestore →
 * open → first 4 KiB read of a data chunk, passes alternating between the build in --old (a dist/ folder,
 * e.g. /work/main/dist) and this tree's dist/, for a backup bench/live-restore-big.mjs made (16 GiB, 64 MiB
 * of data, 1 MiB chunks every 256 MiB). With --rtt: first, 10 sequential requests of each kind to the store
 * (a gateway that leaves Nagle on answers a request with a body ~40 ms late). Wall times: meaningless under
 * load, print the load beside them.
 *
 * `KSCINC_S3_ENDPOINT=… AWS_ACCESS_KEY_ID=… AWS_SECRET_ACCESS_KEY=… node bench/live-restore-ab.mjs --repo s3://lrbench/p1 --old /work/main/dist [--passes 9] [--rtt]`
 */
import os from 'node:os';
import { rm } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

const { values: args } = parseArgs({
  options: { repo: { type: 'string' }, old: { type: 'string' }, passes: { type: 'string', default: '9' }, rtt: { type: 'boolean', default: false } },
});
if (!args.repo || !args.old) throw new Error('usage: --repo LOCATION --old DIST [--passes N] [--rtt]');
const dists = { old: args.old, new: fileURLToPath(new URL('../dist', import.meta.url)) };
const load = async (d) => ({
  liveRestore: (await import(`${d}/engines/live-restore.js`)).liveRestore,
  openKsc: (await import(`${d}/image/open.js`)).openKsc,
  Repository: (await import(`${d}/repo/repository.js`)).Repository,
  openStore: (await import(`${d}/objstore/open.js`)).openStore,
  closePool: (await import(`${d}/compress/pool.js`)).closePool,
});
const mods = { old: await load(dists.old), new: await load(dists.new) };
const MiB = 2 ** 20;
const READ_AT = Math.floor((16 * 1024) / 64) * MiB * 7; // a data chunk of bench/live-restore-big.mjs's disk
const med = (xs) => [...xs].sort((a, b) => a - b)[xs.length >> 1];
const range = (xs) => `median ${med(xs).toFixed(1)} ms [${Math.min(...xs).toFixed(1)}–${Math.max(...xs).toFixed(1)}]`;
const loadavg = () => os.loadavg()[0].toFixed(1);

if (args.rtt) {
  const s = await mods.new.openStore(args.repo);
  const ten = async (name, f) => {
    const xs = [];
    for (let i = 0; i < 10; i++) {
      const t = performance.now();
      await f();
      xs.push(performance.now() - t);
    }
    console.log(`  ${name}: ${range(xs)}`);
  };
  await ten('get config', () => s.get('config'));
  await ten('stat config (HEAD)', () => s.stat('config'));
  await ten('getRange config 10 B', () => s.getRange('config', 0, 10));
  await ten('list locks/', async () => {
    for await (const _ of s.list('locks/'));
  });
  await s.close();
  console.log(`  load ${loadavg()}`);
}

const res = { old: [], new: [] };
for (let i = 0; i < Number(args.passes); i++) {
  for (const k of i % 2 ? ['new', 'old'] : ['old', 'new']) {
    const m = mods[k];
    const live = `${os.tmpdir()}/kscinc-bench-ab-${process.pid}-${k}.ksc`;
    await rm(live, { force: true });
    const t0 = performance.now();
    const store = await m.openStore(args.repo);
    try {
      await m.liveRestore(await m.Repository.open(store), args.repo, 'latest', live);
      const img = await m.openKsc(live, { write: true });
      try {
        await img.read(READ_AT, 4096);
      } finally {
        await img.close();
      }
    } finally {
      await store.close();
      await rm(live, { force: true });
    }
    res[k].push(performance.now() - t0);
  }
}
for (const m of Object.values(mods)) await m.closePool();
for (const k of ['old', 'new']) console.log(`  ${k} (${dists[k]}): liveRestore → open → first read ${range(res[k])}, first pass ${res[k][0].toFixed(0)} ms`);
console.log(`  load ${loadavg()}`);
