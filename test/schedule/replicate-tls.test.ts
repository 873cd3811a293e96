/**
 * The schedule's `replicate:` job over TLS (formats/schedule.md §1.1, formats/migrate.md §5.1, §11), through
 * the real `kscinc schedule run` daemon: its `on shutdown` jobs run at SIGTERM, each one replication cycle to a
 * `kscinc serve --incoming` destination that requires TLS and takes writes only from the source's identity —
 * X.509 (`tls-creds:`) for an image a `kscinc serve` holds (the cycle runs in that server), PSK (`tls-psk:`,
 * relative to the schedule file, with `tls-psk-user:`) for an image no server holds (the cycle runs in the
 * daemon). Both complete a cycle and the replicas are byte-identical (qemu-img compare). A wrong PSK key is
 * refused by the destination's handshake, and the run fails saying so; a credentials folder that does not
 * exist is refused before the daemon starts, naming the job and the file.
 */
import { spawn } from 'node:child_process';
import { copyFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readState, statePathFor } from '../../src/engines/schedule/state.js';
import { CLI } from '../helpers/cli.js';
import { makePki, x509ServeArgs, type Pki } from '../helpers/pki.js';
import { makeBaseAndOverlay, rawOf, rig, sameBytes, serveImage, serveIncomingTls, type Rig } from '../migrate/helpers.js';

let pki: Pki;
beforeAll(() => {
  pki = makePki();
}, 60_000);

const children: ReturnType<typeof spawn>[] = [];
afterAll(() => {
  for (const c of children) if (c.exitCode === null) c.kill('SIGKILL');
});

/** `kscinc serve IMAGE --incoming` with TLS arguments: its nbds:// URI and token. */
/**
 * `kscinc schedule run --config FILE` in the rig's run folder: once it has logged its last job, SIGTERM (its
 * `on shutdown` jobs run then); resolves with the exit code and the log. Without `ready`, it is expected to
 * exit by itself.
 */
function runDaemon(r: Rig, file: string, ready?: string): Promise<{ code: number | null; log: string }> {
  const child = spawn(process.execPath, [CLI, 'schedule', 'run', '--config', file, '--shutdown-timeout', '120s'], {
    cwd: r.dir,
    env: { ...process.env, ...r.env },
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  children.push(child);
  let log = '';
  let sent = false;
  child.stderr!.on('data', (d: Buffer) => {
    log += d.toString();
    if (ready && !sent && log.includes(ready)) {
      sent = true;
      child.kill('SIGTERM');
    }
  });
  const timer = setTimeout(() => child.kill('SIGKILL'), 150_000);
  return new Promise((resolve) =>
    child.on('exit', (code) => {
      clearTimeout(timer);
      resolve({ code, log });
    }),
  );
}

const job = (name: string, image: string, lines: string[]): string => `  - name: ${name}\n    images: [${image}]\n    when: on shutdown\n${lines.map((l) => `    ${l}\n`).join('')}`;

describe('schedule: replicate jobs over TLS', () => {
  it('X.509 (server-held image) and PSK (image no server holds) complete a cycle; a wrong key fails the run clearly; a missing credentials folder is refused at start', async () => {
    const r = rig();
    makeBaseAndOverlay(r, 'vm.ksc', 4);
    for (const img of ['vm2.ksc', 'dst-x.ksc', 'dst-p.ksc']) expect(r.cli(['create', img, '--backing', 'base.raw']).code).toBe(0);
    writeFileSync(join(r.dir, 'more.bin'), Buffer.alloc(3 << 20, 0x5c));
    expect(r.cli(['write', 'vm2.ksc', '7M', '--from', 'more.bin']).code).toBe(0);
    copyFileSync(join(pki.psk, 'keys.psk'), join(r.dir, 'keys.psk')); // tls-psk relative to the schedule file
    const src = await serveImage(r, 'vm.ksc');
    const dx = await serveIncomingTls(r, 'dst-x.ksc', [...x509ServeArgs(pki), '--incoming-peer', 'x509:migration-source']);
    const dp = await serveIncomingTls(r, 'dst-p.ksc', ['--tls-psk', join(pki.psk, 'keys.psk'), '--incoming-peer', 'psk:qemu']);
    try {
      // Refused before the daemon starts: a credentials folder that is not there.
      const missing = join(r.dir, 'missing.yaml');
      writeFileSync(missing, `jobs:\n${job('nocreds', 'vm.ksc', [`replicate: ${dx.uri}`, `token: ${dx.token}`, 'tls-creds: no-such-dir'])}`);
      const m = await runDaemon(r, missing);
      expect(m.code).not.toBe(0);
      expect(m.log).toMatch(/missing\.yaml: job "nocreds": .*no-such-dir\/ca-cert\.pem: cannot read it/);

      // The wrong key: the destination's handshake refuses it, the run fails saying so.
      const wrong = join(r.dir, 'wrong.yaml');
      writeFileSync(wrong, `jobs:\n${job('wrongkey', 'vm2.ksc', [`replicate: ${dp.uri}`, `token: ${dp.token}`, `tls-psk: ${join(pki.pskBad, 'keys.psk')}`])}`);
      const w = await runDaemon(r, wrong, 'job wrongkey: on shutdown');
      expect(w.code, w.log).toBe(1);
      expect(w.log).toMatch(/job wrongkey: replication of \S+vm2\.ksc failed: KSC_E_\w+: TLS with NBD server 127\.0\.0\.1:\d+ export "dst-p\.ksc" failed/);
      const ws = await readState(statePathFor(wrong));
      expect(ws.jobs.wrongkey!.lastRun).toMatchObject({ kind: 'shutdown', result: 'failed' });
      expect(ws.jobs.wrongkey!.lastRun!.errors[0]!.error).toMatch(/TLS with NBD server/);
      const wst = r.cli(['schedule', 'status', '--config', wrong]);
      expect(wst.code).toBe(5); // a last run failed
      expect(wst.stdout).toMatch(/vm2\.ksc: last error: KSC_E_\w+: TLS with NBD server 127\.0\.0\.1:\d+ export "dst-p\.ksc" failed/);

      const good = join(r.dir, 'good.yaml');
      writeFileSync(
        good,
        'timezone: UTC\njobs:\n' +
          job('x509', 'vm.ksc', [`replicate: ${dx.uri}`, `token: ${dx.token}`, `tls-creds: ${pki.x509}`]) +
          job('psk', 'vm2.ksc', [`replicate: ${dp.uri}`, `token: ${dp.token}`, 'tls-psk: keys.psk', 'tls-psk-user: qemu', 'connections: 1', 'bandwidth: 64M']),
      );
      const g = await runDaemon(r, good, 'job psk: on shutdown');
      console.log(`schedule replicate over TLS:\n${g.log}`);
      expect(g.code, g.log).toBe(0);
      expect(g.log).toContain('job x509: ok, 1 replication cycle(s)');
      expect(g.log).toContain('job psk: ok, 1 replication cycle(s)');
      const st = await readState(statePathFor(good));
      for (const name of ['x509', 'psk']) {
        expect(st.jobs[name]!.lastRun).toMatchObject({ kind: 'shutdown', result: 'ok' });
        expect(st.jobs[name]!.lastRun!.backups[0]!.id).toMatch(/^replica@\d{4}-\d\d-\d\dT/);
      }
      expect(src.child.stderr()).toMatch(/replication of \S+vm\.ksc to nbds:/); // the x509 cycle ran in the server
      const gst = r.cli(['schedule', 'status', '--config', good]);
      expect(gst.code, gst.stdout + gst.stderr).toBe(0);
      expect(gst.stdout).toContain('last run: shutdown at');
      expect(gst.stdout).toContain('ok, 1 replication cycle(s)');
      expect(gst.stdout).toContain(`last replication cycle to ${dx.uri}: 20`);
    } finally {
      expect(await src.stop()).toBe(0);
      expect(await dx.stop()).toBe(0);
      expect(await dp.stop()).toBe(0);
    }
    expect(dx.child.stderr()).toMatch(/peer x509:migration-source/);
    expect(dp.child.stderr()).toMatch(/TLS handshake failed/);
    sameBytes(rawOf(r, 'vm.ksc'), rawOf(r, 'dst-x.ksc'));
    sameBytes(rawOf(r, 'vm2.ksc'), rawOf(r, 'dst-p.ksc'));
  }, 240_000);
});
