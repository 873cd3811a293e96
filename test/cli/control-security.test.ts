/**
 * The control socket against another local user (formats/control.md §1, §4) and against bad or concurrent
 * requests (§2). Tests run as root; "another user" is uid 65534 (nobody) through setpriv.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { spawn, type ChildProcess } from 'node:child_process';
import { chmodSync, chownSync, mkdirSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { controlPath, requestBackup, startControl } from '../../src/cli/control.js';
import { runDir } from '../../src/cli/control-trust.js';
import { openImage } from '../../src/image/open.js';
import { nativeOps } from '../../src/io/native.js';
import { CLI, kscinc } from '../helpers/cli.js';
import { exchange } from '../helpers/control-exchange.js';
import { tempDir } from '../helpers/tmp.js';
import { serve } from '../nbd/helpers.js';

const NOBODY = 65534;
const saved = { run: process.env.KSCINC_RUN_DIR, xdg: process.env.XDG_RUNTIME_DIR };
const children: ChildProcess[] = [];
afterEach(() => {
  for (const c of children.splice(0)) c.kill('SIGKILL');
  if (saved.run === undefined) delete process.env.KSCINC_RUN_DIR;
  else process.env.KSCINC_RUN_DIR = saved.run;
  if (saved.xdg === undefined) delete process.env.XDG_RUNTIME_DIR;
  else process.env.XDG_RUNTIME_DIR = saved.xdg;
});

/** Runs a node script as nobody; resolves once it printed `ready` (or with its whole output when it exits). */
function asNobody(script: string, args: string[]): Promise<{ proc: ChildProcess; out: () => string; exited: Promise<number | null> }> {
  const proc = spawn('setpriv', [`--reuid=${NOBODY}`, `--regid=${NOBODY}`, '--clear-groups', process.execPath, '-e', script, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  children.push(proc);
  let out = '';
  const exited = new Promise<number | null>((r) => proc.once('exit', (c) => r(c)));
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`nobody's process did not start: ${out}`)), 10_000);
    proc.stderr!.on('data', (d: Buffer) => (out += d.toString()));
    proc.stdout!.on('data', (d: Buffer) => {
      out += d.toString();
      if (out.includes('ready')) {
        clearTimeout(timer);
        resolve({ proc, out: () => out, exited });
      }
    });
    void exited.then(() => {
      clearTimeout(timer);
      resolve({ proc, out: () => out, exited });
    });
  });
}

/** An impostor: answers every request with a fake successful backup. */
const IMPOSTOR = `require('net').createServer((c) => c.on('data', () => c.end(JSON.stringify({ result: { id: 'fake', full: true } }) + '\\n'))).listen(process.argv[1], () => console.log('ready'));`;

/** A raw image with data and a run folder of our own (0700); returns paths. */
function setup(): { dir: string; img: string; run: string; repo: string } {
  const dir = tempDir('kscinc-ctl-');
  chmodSync(dir, 0o755);
  const img = join(dir, 'disk.raw');
  writeFileSync(img, Buffer.alloc(1 << 20, 0x5a));
  const run = join(dir, 'run');
  mkdirSync(run, { mode: 0o700 });
  process.env.KSCINC_RUN_DIR = run;
  return { dir, img, run, repo: join(dir, 'repo') };
}

/** Plants nobody's impostor socket at the image's control path (the folder is opened for it, then closed again). */
async function plantImpostor(run: string, img: string): Promise<string> {
  const path = controlPath(img);
  chmodSync(run, 0o777);
  await asNobody(IMPOSTOR, [path]);
  chmodSync(run, 0o700);
  expect(statSync(path).uid).toBe(NOBODY);
  return path;
}

/** Holds the image's flock (as `kscinc serve` does) until the test ends. */
async function holdLock(img: string): Promise<void> {
  const proc = spawn('flock', ['-x', img, 'sh', '-c', 'echo ready; sleep 60'], { stdio: ['ignore', 'pipe', 'ignore'] });
  children.push(proc);
  await new Promise<void>((resolve) => proc.stdout!.once('data', () => resolve()));
}

/** One request line on a fresh connection; the parsed response lines until the server closes. */
describe('control socket: another local user', () => {
  it('serve fails when another user created the socket first', async () => {
    const { img, run } = setup();
    await plantImpostor(run, img);
    await expect(serve([img, '--listen', '127.0.0.1:0'])).rejects.toThrow(/exited early with [1-9].*belongs to uid 65534/s);
  });

  it('serve fails in a folder that others may write to (like /tmp)', async () => {
    const { img, run } = setup();
    chmodSync(run, 0o1777);
    await expect(serve([img, '--listen', '127.0.0.1:0'])).rejects.toThrow(/exited early with [1-9].*writable by everyone/s);
  });

  it('backup refuses a socket file of another user: no fake result, no exit 0', async () => {
    const { img, run, repo } = setup();
    await plantImpostor(run, img);
    await holdLock(img); // as a running server (or the impostor itself) would: backup then asks the socket
    const r = kscinc(['backup', img, '--repo', repo, '--json']);
    expect(r.code).not.toBe(0);
    expect(r.stdout).not.toContain('fake');
    expect(r.stderr).toMatch(/belongs to uid 65534/);
  });

  it('backup refuses a server of another uid even when the socket file looks like ours (SO_PEERCRED)', async () => {
    expect(typeof nativeOps()?.peerCred).toBe('function'); // the addon is built in this project's test setup
    const { img, run, repo } = setup();
    const path = await plantImpostor(run, img);
    chownSync(path, 0, 0);
    const err = await requestBackup(img, { op: 'backup', repo }).then(
      () => null,
      (e: unknown) => e as Error & { code: string },
    );
    expect(err?.code).toBe('KSC_E_PERMISSION');
    expect(err?.message).toMatch(/served by uid 65534/);
  });

  it('the server refuses a peer of another uid (SO_PEERCRED) even if its socket became reachable', async () => {
    expect(typeof nativeOps()?.peerCred).toBe('function');
    const { img, run, repo } = setup();
    const dev = await openImage(img, { write: true });
    const stop = await startControl([{ image: img, device: dev }], () => undefined);
    try {
      const path = controlPath(img);
      chmodSync(run, 0o755);
      chmodSync(path, 0o666);
      const client = `const s = require('net').createConnection(process.argv[1], () => s.write(JSON.stringify({ op: 'backup', repo: process.argv[2] }) + '\\n')); let b = ''; s.on('data', (d) => b += d); s.on('close', () => console.log(b));`;
      const p = await asNobody(client, [path, join(run, 'nobody-repo')]);
      await p.exited;
      expect(p.out()).toMatch(/KSC_E_PERMISSION.*uid 65534 may not use/);
      expect(repo).toBeTruthy();
    } finally {
      await stop();
      await dev.close();
    }
  });

  it('under umask 000 the folder is 0700 and the socket 0600', async () => {
    const dir = tempDir('kscinc-ctl-');
    const img = join(dir, 'disk.raw');
    writeFileSync(img, Buffer.alloc(1 << 20));
    const run = join(dir, 'fresh', 'run');
    const proc = spawn('sh', ['-c', `umask 000; exec "${process.execPath}" "${CLI}" serve "${img}" --listen 127.0.0.1:0`], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, KSCINC_RUN_DIR: run },
    });
    children.push(proc);
    let err = '';
    proc.stderr!.on('data', (d: Buffer) => (err += d.toString()));
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`serve did not start: ${err}`)), 20_000);
      proc.stdout!.on('data', (d: Buffer) => {
        if (d.toString().includes('nbd://')) {
          clearTimeout(timer);
          resolve();
        }
      });
    });
    process.env.KSCINC_RUN_DIR = run;
    expect((statSync(run).mode & 0o7777).toString(8)).toBe('700');
    expect((statSync(controlPath(img)).mode & 0o7777).toString(8)).toBe('600');
    proc.kill('SIGTERM');
    await new Promise((r) => proc.once('exit', r));
  });

  it('the run folder: KSCINC_RUN_DIR, else $XDG_RUNTIME_DIR/kscinc, else /run/kscinc for root', () => {
    process.env.KSCINC_RUN_DIR = '/x/y';
    process.env.XDG_RUNTIME_DIR = '/run/user/7';
    expect(runDir()).toBe('/x/y');
    delete process.env.KSCINC_RUN_DIR;
    expect(runDir()).toBe('/run/user/7/kscinc');
    delete process.env.XDG_RUNTIME_DIR;
    expect(runDir()).toBe('/run/kscinc');
  });
});

describe('control socket: requests', () => {
  it('a member of the wrong type gets a clear error naming it', async () => {
    const { img, repo } = setup();
    const dev = await openImage(img, { write: true });
    const stop = await startControl([{ image: img, device: dev }], () => undefined);
    try {
      const path = controlPath(img);
      const cases: [unknown, RegExp][] = [
        [{ op: 'backup', repo: 5 }, /"repo" must be a non-empty string/],
        [{ op: 'backup', repo, tags: 'daily' }, /"tags" must be an array of strings/],
        [{ op: 'backup', repo, tags: [1] }, /"tags" must be an array of strings/],
        [{ op: 'backup', repo, full: 'yes' }, /"full" must be true or false/],
        [{ op: 'backup', repo, bitmap: 3 }, /"bitmap" must be a non-empty string or null/],
        [{ op: 'backup', repo, chunkSize: '4M' }, /"chunkSize" must be a positive whole number/],
        [{ op: 'backup', repo, chunkSize: 1.5 }, /"chunkSize" must be a positive whole number/],
        [{ op: 'backup', repo, extra: 1 }, /unknown member "extra"/],
        [{ op: 7 }, /"op" must be a string/],
        [[1, 2], /not a JSON object/],
      ];
      for (const [req, want] of cases) {
        const got = await exchange(path, JSON.stringify(req));
        expect(got).toHaveLength(1);
        const e = got[0]!.error as { code: string; message: string };
        expect(e.code).toBe('KSC_E_INVALID');
        expect(e.message).toMatch(want);
      }
      expect((await exchange(path, '{not json'))[0]!.error).toMatchObject({ code: 'KSC_E_INVALID' });
    } finally {
      await stop();
      await dev.close();
    }
  });

  it('a second backup while one runs is refused clearly; the first completes', async () => {
    const { img, repo } = setup();
    const dev = await openImage(img, { write: true });
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    const readInto = dev.readInto.bind(dev);
    dev.readInto = async (o: number, b: Buffer): Promise<void> => {
      await gate;
      return readInto(o, b);
    };
    const stop = await startControl([{ image: img, device: dev }], () => undefined);
    try {
      const path = controlPath(img);
      const first = exchange(path, JSON.stringify({ op: 'backup', repo, bitmap: null }));
      await new Promise((r) => setTimeout(r, 300)); // the first has started and waits on the gate
      const second = await exchange(path, JSON.stringify({ op: 'backup', repo, bitmap: null }));
      expect(second).toHaveLength(1);
      expect(second[0]!.error).toMatchObject({ code: 'KSC_E_LOCKED' });
      expect((second[0]!.error as { message: string }).message).toMatch(/a backup of .*disk\.raw is running/);
      release();
      const got = await first;
      expect(Object.keys(got[got.length - 1]!)).toEqual(['result']);
      // Free again once it finished.
      const third = await exchange(path, JSON.stringify({ op: 'backup', repo, bitmap: null }));
      expect(Object.keys(third[third.length - 1]!)).toEqual(['result']);
    } finally {
      release();
      await stop();
      await dev.close();
    }
  });

  it('a connection that sends nothing is closed after the idle timeout', async () => {
    const { img } = setup();
    const dev = await openImage(img, { write: true });
    const stop = await startControl([{ image: img, device: dev }], () => undefined, { idleTimeoutMs: 300 });
    try {
      const t0 = Date.now();
      const got = await exchange(controlPath(img), null);
      expect(Date.now() - t0).toBeLessThan(5000);
      expect(got[0]!.error).toMatchObject({ code: 'KSC_E_INVALID' });
      expect((got[0]!.error as { message: string }).message).toMatch(/none received within 300 ms/);
    } finally {
      await stop();
      await dev.close();
    }
  });
});
