#!/usr/bin/env node
/**
 * Two figures of session 18 (bench/README.md) made again from the tree (they were made with scripts outside
 * it), for the build in dist/ or another one (--dist):
 *
 *  1. loadindex: the instructions of a fresh process's FIRST Repository.loadIndex (the CLI's case: one call
 *     per process, in a cold JIT), as a backup's dedupe calls it (ids only, sized up front), over a repository
 *     of --entries chunks in one index object. callgrind (`node --single-threaded`, so one thread does all)
 *     runs the same child twice, with and without the call; the figure is the difference of the totals.
 *  2. listpacks: repo.listPacks() (names, sizes, times: a stat per pack) against repo.listPackIds() (names
 *     only) at --packs counts (empty pack files in packs/XX/), CPU of the first call in a fresh process
 *     (process.cpuUsage, all threads), alternated --reps times.
 *
 *   node bench/index-load-cost.mjs [--what loadindex,listpacks] [--entries 2367] [--packs 27,10000] [--reps 3]
 *                                  [--dist dist] [--work DIR]
 */
import { execFileSync } from 'node:child_process';
import { mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import os from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';

const here = dirname(fileURLToPath(import.meta.url));
const { values: opt, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    what: { type: 'string', default: 'loadindex,listpacks' },
    entries: { type: 'string', default: '2367' },
    packs: { type: 'string', default: '27,10000' },
    reps: { type: 'string', default: '3' },
    dist: { type: 'string', default: join(here, '../dist') },
    work: { type: 'string', default: join(os.tmpdir(), 'kscinc-index-load-cost') },
    child: { type: 'string' },
  },
});
const dist = resolve(opt.dist);
const imp = (p) => import(pathToFileURL(join(dist, p)).href);
const load = () =>
  os
    .loadavg()
    .map((x) => x.toFixed(1))
    .join(' ');

/** The children: measure one thing in a fresh process. */
async function child(kind, repoDir) {
  const { openStore } = await imp('objstore/open.js');
  const { Repository } = await imp('repo/repository.js');
  const repo = await Repository.open(await openStore(repoDir));
  if (kind === 'loadindex-call' || kind === 'loadindex-nocall') {
    const objects = await repo.indexObjects();
    const expected = Repository.entriesIn(objects);
    if (kind === 'loadindex-call') {
      const idx = await repo.loadIndex(() => undefined, { locations: false, objects, expected });
      if (idx.size === 0 && expected > 0) throw new Error('nothing loaded');
    }
  } else {
    const c0 = process.cpuUsage();
    const n = kind === 'listPacks' ? (await repo.listPacks()).size : (await repo.listPackIds()).length;
    const c = process.cpuUsage(c0);
    process.stdout.write(`${JSON.stringify({ n, cpuMs: (c.user + c.system) / 1000 })}\n`);
  }
}

/** A repository of `entries` chunks (tiny random blobs) in one index object. */
async function makeIndexRepo(dir, entries) {
  const { openStore } = await imp('objstore/open.js');
  const { Repository } = await imp('repo/repository.js');
  rmSync(dir, { recursive: true, force: true });
  const store = await openStore(dir, { create: true });
  const repo = await Repository.init(store, { encrypt: false });
  const w = repo.packWriter();
  for (let i = 0; i < entries; i++) await w.add(randomBytes(16), randomBytes(64), 65536);
  await w.flushIndex();
  await store.close();
}

/** A repository with `packs` empty pack files and no index. */
async function makePackRepo(dir, packs) {
  const { openStore } = await imp('objstore/open.js');
  const { Repository } = await imp('repo/repository.js');
  rmSync(dir, { recursive: true, force: true });
  const store = await openStore(dir, { create: true });
  await Repository.init(store, { encrypt: false });
  await store.close();
  for (let i = 0; i < packs; i++) {
    const id = randomBytes(16).toString('hex');
    mkdirSync(join(dir, 'packs', id.slice(0, 2)), { recursive: true });
    writeFileSync(join(dir, 'packs', id.slice(0, 2), `${id}.pack`), '');
  }
}

/** callgrind's total Ir of `node --single-threaded this --child kind repo`. */
function instructions(kind, repoDir) {
  const out = join(opt.work, `cg.${kind}`);
  rmSync(out, { force: true });
  execFileSync('valgrind', ['--tool=callgrind', `--callgrind-out-file=${out}`, process.execPath, '--single-threaded', fileURLToPath(import.meta.url), '--dist', dist, '--child', kind, repoDir], {
    stdio: ['ignore', 'ignore', 'ignore'],
  });
  const m = /^(?:summary|totals): (\d+)/m.exec(readFileSync(out, 'utf8'));
  return Number(m[1]);
}

if (opt.child) {
  await child(opt.child, positionals[0]);
} else {
  mkdirSync(opt.work, { recursive: true });
  console.log(`index-load-cost: dist ${dist}, load ${load()}`);
  const what = opt.what.split(',');
  if (what.includes('loadindex')) {
    const repoDir = join(opt.work, 'index-repo');
    await makeIndexRepo(repoDir, Number(opt.entries));
    const rows = [];
    for (let r = 0; r < Number(opt.reps); r++) {
      const call = instructions('loadindex-call', repoDir);
      const none = instructions('loadindex-nocall', repoDir);
      rows.push(call - none);
      console.log(
        `loadindex rep ${r + 1}: with the call ${(call / 1e6).toFixed(1)} M, without ${(none / 1e6).toFixed(1)} M, the call ${((call - none) / 1e6).toFixed(1)} M instructions (load ${load()})`,
      );
    }
    rows.sort((a, b) => a - b);
    console.log(`first loadIndex of ${opt.entries} entries in a fresh process: median ${(rows[rows.length >> 1] / 1e6).toFixed(1)} M instructions`);
  }
  if (what.includes('listpacks')) {
    for (const packs of opt.packs.split(',').map(Number)) {
      const repoDir = join(opt.work, `packs-${packs}`);
      await makePackRepo(repoDir, packs);
      const res = { listPacks: [], listPackIds: [] };
      for (let r = 0; r < Number(opt.reps); r++) {
        for (const kind of r % 2 ? ['listPackIds', 'listPacks'] : ['listPacks', 'listPackIds']) {
          const out = execFileSync(process.execPath, [fileURLToPath(import.meta.url), '--dist', dist, '--child', kind, repoDir], { encoding: 'utf8' });
          const j = JSON.parse(out.trim().split('\n').at(-1));
          if (j.n !== packs) throw new Error(`${kind} listed ${j.n} packs, not ${packs}`);
          res[kind].push(j.cpuMs);
        }
      }
      const f = (xs) => `${Math.min(...xs).toFixed(1)}–${Math.max(...xs).toFixed(1)}`;
      console.log(`${packs} packs, first call's CPU ms (${opt.reps} alternations): listPacks ${f(res.listPacks)}, listPackIds ${f(res.listPackIds)} (load ${load()})`);
    }
  }
  for (const n of readdirSync(opt.work)) rmSync(join(opt.work, n), { recursive: true, force: true });
}
