/**
 * Hostile (session 24): `serve --from-backup` (an overlay with the background pull, --no-supervisor) SIGKILLed
 * at seeded points while a client (qemu-io) writes 64 KiB patterns, some of them not yet flushed, then the same
 * command run again on the same overlay. After each restart, every write acknowledged before an acknowledged
 * FLUSH is there; every 4 KiB page holds its value at that flush or one of the writes sent after it (never
 * anything else: not zeros, not the backup's bytes under a flushed write); at the end the pull finishes, the
 * reads equal the model and `kscinc check` is clean.
 */
import { execFile, spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { kscinc } from '../helpers/cli.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { spawnServe, type ServeChild } from '../helpers/serve.js';
import { tempDir } from '../helpers/tmp.js';
import { runDir } from '../supervisor/helpers.js';
import { MiB } from '../backup/helpers/fixtures.js';
import { backedUp, ok, pullStatus, sleep, waitFor } from '../live-restore/serve-helpers.js';

const dir = tempDir('kscinc-s24-failover-kill-');
const K64 = 65536;
const PAGE = 4096;
const ROUNDS = 3;

/** Reads the whole disk through the server (qemu-img over NBD). */
function readAll(uri: string, name: string): Buffer {
  const out = join(dir, `${name}.raw`);
  const r = spawnSync('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri, out], { encoding: 'utf8', timeout: 60_000 });
  expect(r.status, `qemu-img convert ${uri}: ${r.stderr}`).toBe(0);
  return readFileSync(out);
}

describe('s24: serve --from-backup SIGKILLed while a client writes', () => {
  it('every FLUSH-acknowledged write survives, pages hold only values they may, the pull finishes, check is clean', async () => {
    const seed = seedFor('test/hostile/s24-failover-kill-writes.test.ts');
    const rng = new Rng(seed);
    const env = { KSCINC_RUN_DIR: runDir() };
    const size = 16 * MiB;
    const { repo, data } = backedUp(dir, 'f', size, rng, env);
    const overlay = join(dir, 'f-live.ksc');
    const args = ['--from-backup', repo, 'latest', '--overlay', overlay, '--no-supervisor', '--listen', '127.0.0.1:0', '--bandwidth', '2M'];
    /** Each page's value: -1 the backup's bytes, else the byte it is filled with. */
    let state = new Int16Array(size / PAGE).fill(-1);
    const valueOf = (disk: Buffer, p: number): number | string => {
      const page = disk.subarray(p * PAGE, (p + 1) * PAGE);
      if (page.equals(data.subarray(p * PAGE, (p + 1) * PAGE))) return -1;
      return page.every((x) => x === page[0]) ? page[0]! : 'other bytes';
    };
    let server: ServeChild | null = null;
    let lastUri = '';
    try {
      for (let round = 0; round <= ROUNDS; round++) {
        server = spawnServe(args, { env, timeoutMs: 30_000 });
        const uri = (await server.uris)[0]!;
        lastUri = uri;
        // What the restarted server serves: each page at its value at the last acknowledged flush, or a later write.
        if (round > 0) {
          const disk = readAll(uri, `round-${round}`);
          const bad: string[] = [];
          let later = 0;
          for (let p = 0; p < state.length; p++) {
            const v = valueOf(disk, p);
            const allowed = allowedAfter.get(p) ?? [state[p]!];
            if (typeof v !== 'number' || !allowed.includes(v)) bad.push(`page ${p} (offset ${p * PAGE}): ${v}, allowed ${allowed.join('/')}`);
            else {
              if (allowedAfter.has(p)) later += v === allowed[0] ? 0 : 1;
              state[p] = v;
            }
          }
          console.log(`round ${round}: ${allowedAfter.size} pages written after the last acknowledged flush, ${later} of them hold such a write`);
          expect(bad.slice(0, 10), `round ${round}, seed ${seed}: ${bad.length} pages hold what they may not`).toEqual([]);
        }
        if (round === ROUNDS) break;
        // Writes with a flush now and then; the server SIGKILLed after a seeded delay, mid-way.
        const cmds: { off: number; p: number }[] = [];
        const lines: string[] = [];
        for (let i = 0; i < 150; i++) {
          if (i > 0 && rng.chance(0.25)) {
            cmds.push({ off: -1, p: 0 });
            lines.push('-c', 'flush');
          }
          const off = rng.int(0, size / K64 - 1) * K64;
          const p = rng.int(1, 255);
          cmds.push({ off, p });
          lines.push('-c', `write -P ${p} ${off} ${K64}`);
        }
        const delay = rng.int(20, 700);
        const io = runToEnd('qemu-io', ['-f', 'raw', uri, ...lines]);
        const killer = sleep(delay).then(() => server!.proc.kill('SIGKILL'));
        const out = await io;
        await killer;
        await server.exited;
        server = null;
        // Which commands completed: in order, up to the first that failed.
        const res = out.split('\n').filter((l) => /^wrote \d+|failed/.test(l));
        let r = 0;
        let failedAt = cmds.length;
        let lastFlush = -1;
        for (let i = 0; i < cmds.length; i++) {
          const line = res[r];
          if (cmds[i]!.off < 0) {
            if (line && /flush failed/.test(line)) {
              failedAt = i;
              break;
            }
            if (line === undefined && i > 0 && failedAt === cmds.length && r >= res.length) {
              failedAt = i; // nothing after: qemu-io stopped
              break;
            }
            lastFlush = i;
            continue;
          }
          if (!line || !/^wrote/.test(line)) {
            failedAt = i;
            break;
          }
          r++;
        }
        // At the last acknowledged flush every write before it is there; the writes sent after it may be.
        const next = Int16Array.from(state);
        for (let i = 0; i < lastFlush; i++) if (cmds[i]!.off >= 0) next.fill(cmds[i]!.p, cmds[i]!.off / PAGE, (cmds[i]!.off + K64) / PAGE);
        allowedAfter.clear();
        for (let i = lastFlush + 1; i <= Math.min(failedAt, cmds.length - 1); i++) {
          const c = cmds[i]!;
          if (c.off < 0) continue;
          for (let p = c.off / PAGE; p < (c.off + K64) / PAGE; p++) {
            const a = allowedAfter.get(p) ?? [next[p]!];
            a.push(c.p);
            allowedAfter.set(p, a);
          }
        }
        state = next;
        const flushes = cmds.slice(0, failedAt).filter((c) => c.off < 0).length;
        console.log(`round ${round}: killed after ${delay} ms: ${failedAt} of ${cmds.length} commands done, ${flushes} flushes, the last at ${lastFlush} (seed ${seed})`);
      }
      // The server of the last restart goes on: the pull finishes.
      const final = server!;
      const uri = lastUri;
      await waitFor(
        async () => {
          const s = await pullStatus(overlay, env);
          return s?.state === 'done' || /no longer needs the repository/.test(final.stderr()) ? true : null;
        },
        60_000,
        'the pull to finish',
      ).catch(async (e: unknown) => {
        throw new Error(`${(e as Error).message} (seed ${seed}); status: ${JSON.stringify(await pullStatus(overlay, env))}; serve: ${final.stderr().slice(-2000)}`);
      });
      const disk = readAll(uri, 'final');
      const model = Buffer.from(data);
      for (let p = 0; p < state.length; p++) if (state[p]! >= 0) model.fill(state[p]!, p * PAGE, (p + 1) * PAGE);
      expect(disk.equals(model), `seed ${seed}: the final reads equal the model`).toBe(true);
      final.proc.kill('SIGTERM');
      expect(await final.exited, final.stderr()).toBe(0);
      server = null;
    } finally {
      if (server && server.proc.exitCode === null) server.proc.kill('SIGKILL');
    }
    ok(kscinc(['check', overlay]), 'check');
    expect(JSON.parse(ok(kscinc(['info', overlay, '--json']), 'info')).backingChain, 'pulled: no backing').toEqual([]);
  }, 120_000);
});

const allowedAfter = new Map<number, number[]>();

/** Runs a command to its end (its exit status does not matter: the server goes away under it); its output. */
function runToEnd(cmd: string, args: string[]): Promise<string> {
  return new Promise((resolve) => execFile(cmd, args, { encoding: 'utf8', timeout: 60_000, maxBuffer: 1 << 24 }, (_e, out, err) => resolve(`${out}\n${err}`)));
}
