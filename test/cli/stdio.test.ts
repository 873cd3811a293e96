// The CLI's stdout and stderr are made only when needed (src/cli/stdio.ts, issue 19): a command that prints
// only its result writes it with write(2), so on a pipe Node's `net` is never loaded; what it prints, and a
// reader that closes the pipe early, behave as before.
import { spawn, spawnSync } from 'node:child_process';
import { closeSync, constants, existsSync, mkdtempSync, openSync, readFileSync, readSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { Socket } from 'node:net';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { CLI, kscinc } from '../helpers/cli.js';

const dir = mkdtempSync(join(tmpdir(), 'kscinc-stdio-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
const p = (n: string) => join(dir, n);
function ok(args: string[]): string {
  const r = kscinc(args);
  expect(r.stderr).toBe('');
  expect(r.code).toBe(0);
  return r.stdout;
}

/** Runs the CLI with stdout and stderr on pipes, and a preload that prints the modules Node loaded to `list`. */
function withModuleList(args: string[], list: string) {
  const preload = p('list-modules.cjs');
  writeFileSync(preload, `process.on('exit', () => require('node:fs').writeFileSync(${JSON.stringify(list)}, process.moduleLoadList.join('\\n')));\n`);
  const r = spawnSync(process.execPath, ['-r', preload, CLI, ...args], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr, modules: readFileSync(list, 'utf8').split('\n') };
}

describe('stdout and stderr made on first use', () => {
  it('a small incremental backup on pipes prints its summary without loading net; a full backup and a restore print theirs', () => {
    ok(['create', p('a.ksc'), '--size', '4M']);
    writeFileSync(p('data'), Buffer.alloc(1 << 20, 0x5a));
    ok(['write', p('a.ksc'), '1M', '--from', p('data')]);
    for (const [i, args] of [
      ['backup', p('a.ksc'), '--repo', p('repo'), '--no-encrypt', '--json'],
      ['backup', p('a.ksc'), '--repo', p('repo'), '--no-encrypt', '--json'],
      ['restore', 'latest', p('out.raw'), '--repo', p('repo'), '--json'],
    ].entries()) {
      const r = withModuleList(args, p(`modules-${i}`));
      expect(r.stderr).toBe('');
      expect(r.code).toBe(0);
      const summary = JSON.parse(r.stdout) as Record<string, unknown>;
      if (i < 2) expect(summary.full).toBe(i === 0);
      else expect(Object.keys(summary).length).toBeGreaterThan(0);
      // The incremental packs inline (no worker: a worker's stdio would make process.stdout).
      if (i === 1) expect(r.modules.filter((m) => m === 'NativeModule net' || m === 'NativeModule tty')).toEqual([]);
      else expect(r.modules.length).toBeGreaterThan(50);
    }
  });

  it('a reader that closes the pipe early ends the command quietly with status 0', async () => {
    ok(['create', p('m.ksc'), '--size', '64M', '--block-size', '64K']);
    // Every other 64 KiB block written: the map lists ~512 extents, far more than the reader takes.
    const block = Buffer.alloc(64 << 10, 1);
    const img = p('m.raw');
    const buf = Buffer.alloc(64 << 20);
    for (let off = 0; off < buf.length; off += 128 << 10) block.copy(buf, off);
    writeFileSync(img, buf);
    ok(['convert', '-O', 'kscinc', img, p('m2.ksc')]);
    const child = spawn(process.execPath, [CLI, 'map', p('m2.ksc')], { stdio: ['ignore', 'pipe', 'pipe'] });
    let err = '';
    child.stderr.on('data', (d: Buffer) => (err += d.toString()));
    const first = await new Promise<string>((resolve) => child.stdout.once('data', (d: Buffer) => resolve(d.toString())));
    child.stdout.destroy();
    const code = await new Promise<number | null>((resolve) => child.on('close', (c) => resolve(c)));
    expect(first).toMatch(/^offset/);
    expect(err).toBe('');
    expect(code).toBe(0);
  });
  it('on a non-blocking pipe that fills (EAGAIN), the rest goes through the stream: the output is complete and in order', async () => {
    // 16 MiB of 4 KiB blocks, every other one written: `map` prints ≈ 200 KiB in ≈ 4000 lines, a FIFO holds 64 KiB.
    const raw = Buffer.alloc(16 << 20);
    for (let off = 0; off < raw.length; off += 8192) raw.fill(1, off, off + 4096);
    writeFileSync(p('f.raw'), raw);
    ok(['convert', '-O', 'kscinc', p('f.raw'), p('f.ksc'), '--block-size', '4K']);
    const expected = ok(['map', p('f.ksc')]); // on a blocking pipe, read as it comes
    expect(expected.length).toBeGreaterThan(3 * 65536);
    const fifo = p('map-fifo');
    expect(spawnSync('mkfifo', [fifo]).status).toBe(0);
    const r = openSync(fifo, constants.O_RDONLY | constants.O_NONBLOCK);
    const w = openSync(fifo, constants.O_WRONLY); // the child's stdout
    // The preload notes when Node's stream module is loaded: the EAGAIN fallback made process.stdout.
    const marker = p('net-loaded');
    const preload = p('mark-net.cjs');
    writeFileSync(
      preload,
      `const t = setInterval(() => { if (process.moduleLoadList.includes('NativeModule net')) { require('node:fs').writeFileSync(${JSON.stringify(marker)}, ''); clearInterval(t); } }, 5); t.unref();\n`,
    );
    const child = spawn(process.execPath, ['-r', preload, CLI, 'map', p('f.ksc')], { stdio: ['ignore', w, 'pipe'] });
    // libuv made the child's stdout blocking before exec; spawn returns after exec, long before the child's first
    // write: a stream on the same open file description makes it non-blocking again (libuv sets O_NONBLOCK).
    new Socket({ fd: w, readable: false, writable: true }).destroy();
    let err = '';
    child.stderr!.on('data', (d: Buffer) => (err += d.toString()));
    const exited = new Promise<number | null>((resolve) => child.on('close', (c) => resolve(c)));
    let done = false;
    void exited.then(() => (done = true));
    try {
      // Nothing is read until the pipe has refused a write and the stream holds the rest (or the child ended).
      for (let i = 0; !existsSync(marker) && !done; i++) {
        expect(i, 'the command made process.stdout (EAGAIN fallback) within 60 s').toBeLessThan(6000);
        await new Promise((res) => setTimeout(res, 10));
      }
      const b = Buffer.alloc(1 << 16);
      const parts: Buffer[] = [];
      for (;;) {
        let n = -1;
        try {
          n = readSync(r, b);
        } catch (e) {
          if ((e as NodeJS.ErrnoException).code !== 'EAGAIN') throw e;
        }
        if (n === 0) break; // EOF: the child closed its stdout
        if (n > 0) parts.push(Buffer.from(b.subarray(0, n)));
        else if (done) break;
        else await new Promise((res) => setTimeout(res, 5));
      }
      expect(await exited, err).toBe(0);
      expect(err).toBe('');
      const got = Buffer.concat(parts).toString();
      expect(got.length).toBe(expected.length);
      expect(got === expected, 'the same lines in the same order as on a blocking pipe').toBe(true);
      expect(existsSync(marker), 'the pipe refused a write (EAGAIN) and the stream took the rest').toBe(true);
    } finally {
      closeSync(r);
      if (child.exitCode === null) child.kill('SIGKILL');
    }
  }, 120_000);
  it("once a preload has made process.stdout, the command's output goes through it too, so it cannot pass the stream's queue (the review of session 24)", () => {
    ok(['create', p('o.ksc'), '--size', '1M']);
    const preload = p('stdout-first.cjs');
    const seen = p('stdout-writes');
    // The preload makes the stream (as a preload that prints would), then records what goes through it.
    writeFileSync(
      preload,
      `const w = process.stdout.write.bind(process.stdout); const got = [];
process.stdout.write = (c, ...a) => (got.push(String(c)), w(c, ...a));
process.on('exit', () => require('node:fs').writeFileSync(${JSON.stringify(seen)}, got.join('')));\n`,
    );
    const r = spawnSync(process.execPath, ['-r', preload, CLI, 'info', p('o.ksc'), '--json'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
    expect(r.status, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout), 'the command printed its JSON').toHaveProperty('format');
    expect(readFileSync(seen, 'utf8'), 'the JSON went through the stream the preload made (else write(2) may pass its queue)').toBe(r.stdout);
  });
});
