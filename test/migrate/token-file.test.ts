/**
 * `serve --incoming --token-file FILE` (formats/migrate.md §5.1): the token survives a destination restart,
 * so a running replication (§11.5) resumes by itself once the destination is back at the same address —
 * no `replicate stop` / `start --token NEW`. The file is created 0600 when missing and refused when other
 * users can reach it, when it is not ours, not a regular file, or holds anything but a token.
 */
import * as net from 'node:net';
import { chmodSync, existsSync, mkdirSync, readFileSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { tokenFromFile } from '../../src/cli/incoming-token.js';
import type { ReplicateStatus } from '../../src/engines/replicate.js';
import { tempDir } from '../helpers/tmp.js';
import { makeBaseAndOverlay, rawOf, rig, sameBytes, serveImage } from './helpers.js';
import { LogWriter, readSpan, untilReplica } from './replicate-helpers.js';

const seed = Number(process.env.SEED ?? Date.now() % 1_000_000);
console.log(`token-file.test seed ${seed}`);

/** A loopback port that was free a moment ago. */
function freePort(): Promise<number> {
  return new Promise((res, rej) => {
    const s = net.createServer();
    s.once('error', rej);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address() as net.AddressInfo;
      s.close(() => res(port));
    });
  });
}

describe('serve --incoming --token-file', () => {
  it('creates the file 0600 with a new token, reads it back, refuses a file others can reach, a symlink, bad content', async () => {
    const dir = tempDir('kscinc-token-file-');
    const f = join(dir, 'dst.token');
    const t = await tokenFromFile(f);
    expect(t).toMatch(/^[0-9a-f]{32}$/);
    expect(statSync(f).mode & 0o777).toBe(0o600);
    expect(readFileSync(f, 'utf8')).toBe(`${t}\n`);
    expect(await tokenFromFile(f)).toBe(t);
    chmodSync(f, 0o640);
    await expect(tokenFromFile(f)).rejects.toMatchObject({ code: 'KSC_E_PERMISSION', message: expect.stringMatching(/other users may read or write it \(mode 640\)/) });
    chmodSync(f, 0o600);
    const link = join(dir, 'link.token');
    symlinkSync(f, link);
    await expect(tokenFromFile(link)).rejects.toMatchObject({ code: 'KSC_E_INVALID', message: expect.stringMatching(/cannot open it \(ELOOP\)/) });
    const bad = join(dir, 'bad.token');
    writeFileSync(bad, 'NOT-A-TOKEN\n', { mode: 0o600 });
    await expect(tokenFromFile(bad)).rejects.toMatchObject({ code: 'KSC_E_INVALID', message: expect.stringMatching(/expected 32 lowercase hex digits/) });
    const sub = join(dir, 'sub');
    mkdirSync(sub, { mode: 0o700 });
    await expect(tokenFromFile(sub)).rejects.toMatchObject({ code: 'KSC_E_INVALID', message: expect.stringMatching(/not a regular file/) });
    await expect(tokenFromFile(join(dir, 'none', 'x.token'))).rejects.toMatchObject({ code: 'KSC_E_INVALID', message: expect.stringMatching(/cannot create it \(ENOENT\)/) });
    const r = rig();
    expect(r.cli(['create', 'x.ksc', '--size', '16M']).code).toBe(0);
    expect(r.cli(['serve', 'x.ksc', '--token-file', f]).stderr).toMatch(/--token-file goes with --incoming/);
  }, 60_000);

  it('a replication resumes by itself after the destination restarts at the same address with the same token file', async () => {
    const r = rig();
    makeBaseAndOverlay(r, 'vm.ksc', 24);
    expect(r.cli(['create', 'dst.ksc', '--backing', 'base.raw']).code).toBe(0);
    const tokenFile = join(r.dir, 'dst.token');
    const port = await freePort();
    const destination = ['--incoming', '--token-file', tokenFile, '--listen', `127.0.0.1:${port}`];
    const src = await serveImage(r, 'vm.ksc');
    let dst = await serveImage(r, 'dst.ksc', destination);
    expect(existsSync(tokenFile)).toBe(true);
    const w = new LogWriter(src.uri, seed);
    try {
      await w.start();
      r.json(['replicate', 'start', 'vm.ksc', '--to', dst.uri, '--token', dst.token!, '--every', '2s']);
      const first = await untilReplica(r, 'vm.ksc', (s) => s.lastConsistentAt !== null, 'reached a consistent point');
      dst.child.proc.kill('SIGKILL');
      await dst.child.exited;
      const failed = await untilReplica(r, 'vm.ksc', (s) => s.error !== null, 'failed while the destination was away');
      const token = dst.token;
      dst = await serveImage(r, 'dst.ksc', destination);
      expect(dst.token).toBe(token); // the same token from the file
      expect(dst.uri).toBe(`nbd://127.0.0.1:${port}/dst.ksc`);
      // The timer's next cycles reach it again, with no stop/start: a newer consistent point, no error.
      const back = await untilReplica(r, 'vm.ksc', (s) => s.error === null && s.lastConsistentAt !== null && s.lastConsistentAt > failed.lastConsistentAt!, 'resumed by itself', 90_000);
      expect(back.state).toBe('running');
      console.log(`consistent at ${first.lastConsistentAt}, failed (${failed.error?.message}), resumed at ${back.lastConsistentAt}`);
      await w.stop();
      // Two more whole cycles after the last write: the second started after it, so the replica holds it.
      const c = r.json<ReplicateStatus>(['replicate', 'status', 'vm.ksc']).cycles;
      await untilReplica(r, 'vm.ksc', (s) => s.cycles >= c + 2 && s.error === null, 'did two more cycles');
      const done = r.json<ReplicateStatus>(['replicate', 'stop', 'vm.ksc']);
      expect(done.state).toBe('stopped');
      expect(w.prefixOf(await readSpan(dst.uri))).toBe(w.log.length);
    } finally {
      await w.stop().catch(() => undefined);
      expect(await src.stop()).toBe(0);
      expect(await dst.stop()).toBe(0);
    }
    sameBytes(rawOf(r, 'vm.ksc'), rawOf(r, 'dst.ksc'));
  }, 180_000);
});
