/**
 * Migration with a real peer as the writer (issue 17): qemu-io, driven one command at a time on its stdin,
 * writes to the source export before, during and through the switch-over. formats/migrate.md §1 rule 1 and §4
 * say what it must see: every write acknowledged before the switch-over is on the destination; a write that
 * arrives while `complete` holds changes, or after it, fails with EPERM (the VM has moved) — never another
 * error, never an error before `complete` was asked. The destination is then compared with the source frozen
 * at the switch-over (the source refuses writes from then on) by `qemu-img compare` over NBD, and with the
 * model of qemu-io's acknowledged writes.
 */
import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import type { MigrateStatus } from '../../src/engines/migrate.js';
import { CLI, run } from '../helpers/cli.js';
import { MiB, makeBaseAndOverlay, prng, rawOf, rig, serveImage, type Rig } from './helpers.js';

const seed = Number(process.env.SEED ?? Date.now() % 1_000_000);
console.log(`qemu-io-writer.test seed ${seed}`);

/** The kscinc CLI without blocking the event loop (qemu-io's replies are read meanwhile). */
function kscincAsync(r: Rig, args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const p = spawn(process.execPath, [CLI, ...args], { cwd: r.dir, env: { ...process.env, ...r.env } });
    let stdout = '';
    let stderr = '';
    p.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    p.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    p.on('close', (code) => resolve({ code, stdout, stderr }));
  });
}

interface Outcome {
  at: number;
  error: string | null;
}

/**
 * qemu-io on an NBD URI, one `write -P BYTE OFF LEN` at a time: the next is sent once the previous one's reply
 * (`wrote …` or `write failed: …`) arrived, so `model` holds exactly the acknowledged bytes.
 */
class QemuIoWriter {
  readonly outcomes: Outcome[] = [];
  private readonly proc: ChildProcessWithoutNullStreams;
  private out = '';
  private wake: (() => void) | null = null;
  private stopping = false;
  private loop: Promise<void> = Promise.resolve();

  constructor(
    uri: string,
    readonly model: Buffer,
    private readonly rnd: () => number,
    private readonly span = 16 * MiB,
  ) {
    this.proc = spawn('qemu-io', ['-f', 'raw', uri]);
    this.proc.stdout.on('data', (d: Buffer) => {
      this.out += d.toString();
      this.wake?.();
    });
    this.proc.stderr.on('data', (d: Buffer) => {
      this.out += d.toString();
      this.wake?.();
    });
  }

  get acknowledged(): number {
    return this.outcomes.filter((o) => o.error === null).length;
  }

  /** Waits for a reply line of the current command (bounded: a held write is answered once `complete` ends). */
  private async reply(): Promise<string> {
    const t = Date.now();
    for (;;) {
      const m = /(wrote \d+\/\d+ bytes at offset \d+|write failed: .*)$/m.exec(this.out); // after a `qemu-io> ` prompt
      if (m) {
        this.out = this.out.slice(m.index + m[0].length);
        return m[1]!;
      }
      if (this.proc.exitCode !== null) throw new Error(`qemu-io exited (${this.proc.exitCode}): ${this.out}`);
      if (Date.now() - t > 60_000) throw new Error(`qemu-io: no reply within 60 s: ${this.out}`);
      await new Promise<void>((r) => {
        this.wake = r;
        setTimeout(r, 200);
      });
    }
  }

  start(): void {
    this.loop = (async () => {
      while (!this.stopping) {
        const len = 4096 * (1 + Math.floor(this.rnd() * 16));
        const off = 4096 * Math.floor((this.rnd() * (this.span - len)) / 4096);
        const byte = 1 + Math.floor(this.rnd() * 254);
        this.proc.stdin.write(`write -P ${byte} ${off} ${len}\n`);
        const line = await this.reply();
        const error = line.startsWith('write failed') ? line : null;
        this.outcomes.push({ at: performance.now(), error });
        if (error) return; // the source refuses from now on
        this.model.fill(byte, off, off + len);
        if (this.outcomes.length % 8 === 0) await new Promise((r) => setTimeout(r, 2));
      }
    })();
  }

  async atLeast(n: number): Promise<void> {
    const want = this.acknowledged + n;
    const t = Date.now();
    while (this.acknowledged < want) {
      if (Date.now() - t > 30_000) throw new Error(`qemu-io: ${this.acknowledged}/${want} writes after 30 s`);
      if (this.outcomes.some((o) => o.error)) throw new Error(`qemu-io failed early: ${JSON.stringify(this.outcomes.find((o) => o.error))}`);
      await new Promise((r) => setTimeout(r, 10));
    }
  }

  /** Stops after the current command (or after its first failure) and quits qemu-io; returns its exit code. */
  async stop(): Promise<number | null> {
    this.stopping = true;
    await this.loop;
    this.proc.stdin.end('quit\n');
    if (this.proc.exitCode !== null) return this.proc.exitCode;
    return new Promise((r) => this.proc.once('exit', (c) => r(c)));
  }

  kill(): void {
    this.proc.kill('SIGKILL');
  }
}

describe('kscinc migrate with qemu-io writing all along', () => {
  it('acknowledged writes all reach the destination; the only errors are EPERM, from the switch-over on; destination == frozen source', async () => {
    const r = rig();
    makeBaseAndOverlay(r, 'vm.ksc', 4);
    expect(r.cli(['create', 'dst.ksc', '--backing', 'base.raw']).code).toBe(0);
    const model = readFileSync(rawOf(r, 'vm.ksc'));
    const src = await serveImage(r, 'vm.ksc');
    const dst = await serveImage(r, 'dst.ksc', ['--incoming']);
    const w = new QemuIoWriter(src.uri, model, prng(seed));
    let askedAt = 0;
    let exitCode: number | null = null;
    let done: MigrateStatus | undefined;
    let stopped: (number | null)[] = [];
    try {
      try {
        w.start();
        await w.atLeast(20);
        const started = await kscincAsync(r, ['migrate', 'start', 'vm.ksc', '--to', dst.uri, '--token', dst.token!, '--json']);
        expect(started.code, started.stderr).toBe(0);
        const before = w.acknowledged;
        for (let i = 0; ; i++) {
          const s = await kscincAsync(r, ['migrate', 'status', 'vm.ksc', '--json']);
          const st = JSON.parse(s.stdout) as MigrateStatus;
          if (st.phase === 'converged' && st.rounds >= 2) break;
          // Converged after the first round is no end yet: rounds go on until a second one shows writes were carried.
          expect(['copying', 'converged'], s.stdout).toContain(st.phase);
          expect(i, 'the migration converges within 60 s').toBeLessThan(600);
          await new Promise((res) => setTimeout(res, 100));
        }
        await w.atLeast(30);
        expect(w.acknowledged - before, 'qemu-io wrote while the migration copied').toBeGreaterThanOrEqual(30);
        askedAt = performance.now();
        const c = await kscincAsync(r, ['migrate', 'complete', 'vm.ksc', '--json']);
        expect(c.code, c.stderr).toBe(0);
        done = JSON.parse(c.stdout) as MigrateStatus;
        expect(done.phase).toBe('completed');
        // The source refuses writes from now on: the writer's next write (or the one held) fails with EPERM.
        const t = Date.now();
        while (!w.outcomes.some((o) => o.error) && Date.now() - t < 30_000) await new Promise((res) => setTimeout(res, 20));
      } finally {
        exitCode = await w.stop().catch((e: unknown) => (console.log(`qemu-io writer: ${(e as Error).message}`), w.kill(), -1));
      }
      console.log(`qemu-io writer: ${w.acknowledged} acknowledged writes; pauseMs ${done!.pauseMs}, bytesSent ${done!.bytesSent}, rounds ${done!.rounds}`);
      const errors = w.outcomes.filter((o) => o.error);
      expect(errors.length, 'exactly one failed write: the first after the switch-over (the writer then stops)').toBe(1);
      expect(errors[0]!.error).toMatch(/Operation not permitted/);
      expect(errors[0]!.at, 'no write failed before complete was asked').toBeGreaterThan(askedAt);
      expect(w.outcomes.at(-1)!.error, 'no acknowledged write after the refusal').not.toBeNull();
      expect(exitCode, 'qemu-io quit normally; its status 1 counts the one refused write').toBe(1);
      // The source frozen at the switch-over (it takes no more writes) against the destination, both over NBD.
      const cmp = run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src.uri, dst.uri]);
      expect(cmp.code, cmp.stdout + cmp.stderr).toBe(0);
      const want = join(r.dir, 'model.raw');
      writeFileSync(want, model);
      const m = run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', want, dst.uri]);
      expect(m.code, `every write qemu-io saw acknowledged is on the destination: ${m.stdout}${m.stderr}`).toBe(0);
    } finally {
      stopped = [await src.stop(), await dst.stop()]; // whatever failed above: no server is left running
    }
    expect(stopped, 'both servers exit cleanly').toEqual([0, 0]);
  }, 120_000);
});
