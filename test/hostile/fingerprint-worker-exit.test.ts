/**
 * Hostile: the base-fingerprint Worker of src/engines/migrate-base-cache.ts (a worker thread per base file,
 * terminated once it answered) meets the process ending while it starts or hashes: process.exit, a natural
 * end and an uncaught exception, each at 6 delays, in child processes (the compiled library in dist/) beside
 * 3 busy loops. Session 16's pool bug was a Node abort when a process exited while its workers loaded; here
 * every run must end with its own exit code, no abort, no hang; a run that lets the worker finish gets the
 * in-thread fingerprint.
 */
import { spawn } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { type Ran, runNode } from '../helpers/child.js';
import { tempDir } from '../helpers/tmp.js';

const DIST = fileURLToPath(new URL('../../dist/', import.meta.url));
const dir = tempDir('kscinc-hostile-fpw-');
const base = join(dir, 'base.raw');
writeFileSync(base, Buffer.alloc(8 << 20, 0x3c));

const PRELUDE = `
const { openImage } = await import(${JSON.stringify(join(DIST, 'image', 'open.js'))});
const { fingerprintOffThread, fingerprintsComputed } = await import(${JSON.stringify(join(DIST, 'engines', 'migrate-base-cache.js'))});
const { fingerprintV1 } = await import(${JSON.stringify(join(DIST, 'engines', 'migrate-base.js'))});
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const D = Number(process.argv[2]);
const dev = await openImage(${JSON.stringify(base)});
`;

const SCRIPTS: { name: string; body: string; code: number; stderr?: RegExp }[] = [
  { name: 'process.exit while the worker starts or hashes', body: `void fingerprintOffThread(dev, fingerprintV1); await sleep(D); process.exit(7);`, code: 7 },
  {
    name: 'a natural end while it runs (its answer awaited)',
    body: `const f = await fingerprintOffThread(dev, fingerprintV1); if (f !== await fingerprintV1(dev)) throw new Error('wrong fingerprint ' + f); if (fingerprintsComputed().worker !== 1) throw new Error('not in the worker: ' + JSON.stringify(fingerprintsComputed()));`,
    code: 0,
  },
  {
    name: 'an uncaught exception while it runs',
    body: `void fingerprintOffThread(dev, fingerprintV1).catch(() => {}); setTimeout(() => { throw new Error('hostile boom'); }, D);`,
    code: 1,
    stderr: /hostile boom/,
  },
];

let scripts = 0;
function runScript(body: string, delay: number): Promise<Ran> {
  // A script file, not --input-type=module -e: a Worker inherits execArgv, and --input-type fails its start.
  const file = join(dir, `s${scripts++}.mjs`);
  writeFileSync(file, PRELUDE + body);
  return runNode([file, String(delay)], 60_000);
}

describe('the fingerprint worker and the end of its process', () => {
  it('every run ends with its own exit code: no abort, no hang', async () => {
    const busy = Array.from({ length: 3 }, () => spawn(process.execPath, ['-e', 'for (;;) {}'], { stdio: 'ignore' }));
    const bad: string[] = [];
    try {
      for (const s of SCRIPTS) {
        for (const delay of [0, 1, 3, 10, 30, 100]) {
          const r = await runScript(s.body, delay);
          const ok = !r.hung && r.signal === null && r.code === s.code && !/Assertion|abort|FATAL|Check failed/i.test(r.stderr) && (!s.stderr || s.stderr.test(r.stderr));
          if (!ok) bad.push(`${s.name} (delay ${delay}): code ${r.code} signal ${r.signal}${r.hung ? ' HUNG' : ''}: ${r.stderr.slice(0, 400)}`);
        }
      }
    } finally {
      for (const b of busy) b.kill('SIGKILL');
    }
    expect(bad).toEqual([]);
  }, 600_000);
});
