// The id of a build: a hash of the ES modules tsc wrote to dist/ (every dist/**/*.js outside the bundles),
// which scripts/bundle-cli.mjs stamps into the CLI bundle (src/util/build-id.ts BUILD_ID) and
// scripts/bundle-worker.mjs writes as the first line of each worker build. Both bundle the same modules after
// one tsc run, so both get one id; a worker build left from another build has another (src/util/worker-entry.ts).
import { createHash } from 'node:crypto';
import { readdirSync, readFileSync } from 'node:fs';
import { join, relative } from 'node:path';

const SKIP = new Set(['bundle', 'workers']);

export function buildId(dist) {
  const files = [];
  const walk = (d) => {
    for (const e of readdirSync(d, { withFileTypes: true })) {
      if (e.isDirectory()) {
        if (!e.name.startsWith('.') && !(d === dist && SKIP.has(e.name))) walk(join(d, e.name));
      } else if (e.name.endsWith('.js')) files.push(join(d, e.name));
    }
  };
  walk(dist);
  const h = createHash('sha256');
  for (const f of files.map((f) => relative(dist, f)).sort())
    h.update(`${f}\0`)
      .update(readFileSync(join(dist, f)))
      .update('\0');
  return h.digest('hex').slice(0, 20);
}

/** A rolldown plugin that stamps `id` into dist/util/build-id.js (its BUILD_ID). */
export function stampBuildId(id) {
  return {
    name: 'kscinc-stamp-build-id',
    transform(code, file) {
      if (!/[\\/]dist[\\/]util[\\/]build-id\.js$/.test(file)) return null;
      const placeholder = "export const BUILD_ID = 'unstamped';";
      if (!code.includes(placeholder)) throw new Error(`build-id: ${file} does not hold ${placeholder}: update scripts/build-id.mjs`);
      return { code: code.replace(placeholder, `export const BUILD_ID = ${JSON.stringify(id)};`), map: null };
    },
  };
}
