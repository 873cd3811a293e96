// Fresh process: what an incremental does with the repository's index before its pipeline starts: the
// index loaded for deduplication as the backup loads it (engines/backup/dedupe.js loadDedupe) and the newest
// backup vouched for as the parent (engines/backup/parent.js: every chunk it lists looked up). With `none`
// as the third argument it opens the repository and reads the parent's manifest only, so the difference of
// the two under callgrind is the index's and the vouch's cost (bench/README.md, session 22); with `load`, it
// loads the index and stops (the parent's manifest read meanwhile, as a backup reads it).
// Usage: node --single-threaded bench/probes/index-vouch.mjs DIST REPO [none|load]   (DIST = a build's dist/)
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
const [dist, repoDir, mode] = process.argv.slice(2);
const imp = (p) => import(pathToFileURL(join(dist, p)).href);
const [{ openStore }, { Repository }, { loadDedupe }, { searchParent }] = await Promise.all([
  imp('objstore/open.js'),
  imp('repo/repository.js'),
  imp('engines/backup/dedupe.js'),
  imp('engines/backup/parent.js'),
]);
const repo = await Repository.open(await openStore(repoDir));
const ids = await repo.listBackupIds();
const { info } = await repo.readManifestInfoOrWhole(ids.at(-1));
const settings = { exactIds: 1 << 20, bitsPerId: undefined, window: 1 << 17 };
if (mode === 'none' || mode === 'load') {
  await repo.readManifest(ids.at(-1));
  if (mode === 'load') await loadDedupe(repo, 41, settings);
} else {
  const search = searchParent(repo, Promise.resolve(ids), { disk: info.disk, token: info.bitmapToken, bitmap: 'backup', size: info.size });
  const dedupe = await loadDedupe(repo, 41, settings);
  const { parent, why } = await search.vouch(dedupe);
  if (!parent) throw new Error(`no parent: ${why}`);
}
process.exit(0);
