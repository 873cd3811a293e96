// Instructions (callgrind, all threads, Ir) of two CLI builds side by side, alternated: `open` runs `kscinc
// backup MISSING.ksc --repo R --no-encrypt --json`, which loads what a backup loads before it opens its image
// and then fails; `incr` runs the whole CLI incremental of race 6 (the 1 GiB test image as ksc_inc, a full
// backup at 256 KiB chunks made once by NEW, then 1 % of the chunks (41) rewritten with fresh random data
// before each run). NODE_EXTRA_CA_CERTS is unset (Node would parse the CA file first). bench/README.md, session 22.
// Usage: node bench/probes/cli-callgrind.mjs NEW_KSCINC_CJS OLD_KSCINC_CJS [PAIRS=3] [open|incr] [WORK=/tmp/kscinc-cli-callgrind] [IMAGE=/tmp/bench-img/test-1g.raw]
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';

const [NEW, OLD, PAIRS = '3', MODE = 'incr', work = '/tmp/kscinc-cli-callgrind', source = '/tmp/bench-img/test-1g.raw'] = process.argv.slice(2);
if (!NEW || !OLD || !['open', 'incr'].includes(MODE)) throw new Error('usage: cli-callgrind.mjs NEW_KSCINC_CJS OLD_KSCINC_CJS [PAIRS] [open|incr] [WORK] [IMAGE]');
mkdirSync(work, { recursive: true });
const dist = join(NEW, '..', '..');
const imp = (p) => import(pathToFileURL(join(dist, p)).href);
const image = join(work, 'inc.ksc');
const repo = join(work, 'repo');
const C = 256 * 1024;
/** mulberry32 */
function rng(seed) {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
const env = { ...process.env };
delete env.NODE_EXTRA_CA_CERTS;
let rewrite = async () => undefined;
if (MODE === 'incr') {
  const [{ convertImage }, { openKsc }] = await Promise.all([imp('engines/convert.js'), imp('image/open.js')]);
  const size = Number(execFileSync('stat', ['-c', '%s', source], { encoding: 'utf8' }));
  const r = rng(0xbac1f);
  const picked = new Set();
  while (picked.size < Math.round((size / C) * 0.01)) picked.add(Math.floor(r() * (size / C)));
  const offsets = [...picked].sort((a, b) => a - b).map((s) => s * C);
  let seed = 0xda7a;
  rewrite = async () => {
    const img = await openKsc(image, { write: true });
    const g = rng(seed++);
    const buf = Buffer.allocUnsafe(C);
    for (const off of offsets) {
      for (let i = 0; i < C; i += 4) buf.writeUInt32LE((g() * 4294967296) >>> 0, i);
      await img.write(off, buf);
    }
    await img.flush();
    await img.close();
  };
  if (!existsSync(repo)) {
    rmSync(image, { force: true });
    await convertImage(source, image, { format: 'ksc_inc' });
    const img = await openKsc(image, { write: true });
    await img.addBitmap('backup', { enabled: true });
    await img.flush();
    await img.close();
    await rewrite();
    execFileSync(process.execPath, [NEW, 'backup', image, '--repo', repo, '--no-encrypt', '--chunk-size', '256K', '--json'], { env, stdio: 'ignore' });
  }
}
/** M instructions of one run of `cli`. */
function callgrind(cli) {
  for (const f of readdirSync(work)) if (f.startsWith('cg.out')) rmSync(join(work, f));
  const target = MODE === 'incr' ? image : join(work, 'MISSING.ksc');
  const p = spawnSync('valgrind', ['--tool=callgrind', `--callgrind-out-file=${work}/cg.out.%p`, process.execPath, cli, 'backup', target, '--repo', repo, '--no-encrypt', '--json'], {
    env,
    encoding: 'utf8',
  });
  if (MODE === 'incr' && JSON.parse(p.stdout).full) throw new Error(`${cli}: the backup was full`);
  let total = 0;
  for (const f of readdirSync(work)) if (f.startsWith('cg.out')) total += Number(/^(?:totals|summary): (\d+)/m.exec(readFileSync(join(work, f), 'utf8'))[1]);
  return total / 1e6;
}
const res = { old: [], new: [] };
for (let p = 0; p < Number(PAIRS); p++) {
  for (const n of p % 2 ? ['new', 'old'] : ['old', 'new']) {
    await rewrite();
    res[n].push(Number(callgrind(n === 'old' ? OLD : NEW).toFixed(1)));
    console.log(`${n} ${res[n].at(-1)} M (load ${readFileSync('/proc/loadavg', 'utf8').split(' ')[0]})`);
  }
}
const median = (a) => [...a].sort((x, y) => x - y)[Math.floor(a.length / 2)];
console.log(`${MODE}: old ${res.old.join(', ')} (median ${median(res.old)}); new ${res.new.join(', ')} (median ${median(res.new)})`);
