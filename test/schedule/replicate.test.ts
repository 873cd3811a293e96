/**
 * The schedule's `replicate:` job (formats/migrate.md §11, README "Schedules"): the fields are checked with
 * clear errors, and the daemon (on a fake clock) runs one replication cycle per run — the library's
 * replicateOnce on an image no server holds, to a real `kscinc serve --incoming` — recording the replica's
 * consistent point; the second run sends only what was written since (bytes counted), and the replica is
 * byte-identical to the source (qemu-img compare).
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { parseConfigText } from '../../src/engines/schedule/config.js';
import { ScheduleDaemon, type Clock } from '../../src/engines/schedule/daemon.js';
import { readState, statePathFor } from '../../src/engines/schedule/state.js';
import { replicateOnce } from '../../src/cli/replicate-commands.js';
import { MiB, makeBaseAndOverlay, rawOf, rig, sameBytes, serveImage } from '../migrate/helpers.js';

const job = (extra: string): string => `jobs:\n  - name: standby\n    images: [/v/vm.ksc]\n    when: every 1 day at 02:00\n    timezone: UTC\n${extra}`;
const parse = (text: string): ReturnType<typeof parseConfigText> => parseConfigText(text, '/etc/s.yaml');

describe('schedule: replicate jobs', () => {
  it('parses replicate and its target options (named like the flags of replicate once), and refuses what does not fit', () => {
    const j = parse(job(`    replicate: nbd://10.0.0.2:10809/vm\n    token: ${'ab'.repeat(16)}\n`)).jobs[0]!;
    expect(j.replicate).toBe('nbd://10.0.0.2:10809/vm');
    expect(j.target).toEqual({ token: 'ab'.repeat(16) });
    const all = parse(
      job(
        `    replicate: nbds://10.0.0.2:10809/vm\n    tls-psk: keys/keys.psk\n    tls-psk-user: source\n    bandwidth: 50M\n    connections: 4\n    compress: false\n    base-fingerprint: v1:67108864:${'0f'.repeat(32)}\n`,
      ),
    ).jobs[0]!;
    expect(all.target).toEqual({ tlsPsk: '/etc/keys/keys.psk', tlsPskUser: 'source', bandwidth: '50M', connections: 4, compress: false, baseFingerprint: `v1:67108864:${'0f'.repeat(32)}` });
    expect(parse(job(`    replicate: nbds://h/vm\n    tls-creds: /etc/pki/kscinc\n    compress: true\n    bandwidth: 8192\n`)).jobs[0]!.target).toEqual({
      tlsCreds: '/etc/pki/kscinc',
      bandwidth: '8192',
    });
    const bad: [string, RegExp][] = [
      [`    replicate: nbd://h/vm\n    repo: /r\n`, /replicate job takes no "repo"/],
      [`    replicate: nbd://h/vm\n    keep: { last: 1 }\n`, /takes no "keep"/],
      [`    replicate: /srv/vm.ksc\n`, /expected an NBD URI/],
      [`    replicate: nbds://h/vm\n`, /job "standby": replicate "nbds:\/\/h\/vm": nbds:\/\/ means TLS: give tls-creds .* or tls-psk/],
      [`    replicate: nbd://h/vm\n    tls-creds: /a\n    tls-psk: /b\n`, /tls-creds and tls-psk are exclusive/],
      [`    replicate: nbd://h/vm\n    tls-psk-user: me\n`, /tls-psk-user goes with tls-psk/],
      [`    replicate: nbd://h/vm\n    tls-creds: ""\n`, /tls-creds must be a non-empty string/],
      [`    replicate: nbd://h/vm\n    tls-psk: [a]\n`, /tls-psk must be a non-empty string, not a list/],
      [`    replicate: nbd://h/vm\n    tls-cert: /a\n`, /unknown field "tls-cert"/],
      [`    replicate: nbd://h/vm\n    token: xyz\n`, /token must be the 32 lowercase hex digits/],
      [`    replicate: nbd://h/vm\n    bandwidth: 1K\n`, /bandwidth "1K": at least 4096 bytes per second/],
      [`    replicate: nbd://h/vm\n    bandwidth: fast\n`, /bandwidth "fast" is not a size/],
      [`    replicate: nbd://h/vm\n    connections: 17\n`, /connections must be a whole number from 1 to 16, not 17/],
      [`    replicate: nbd://h/vm\n    compress: no\n`, /compress must be true or false/],
      [`    replicate: nbd://h/vm\n    base-fingerprint: abc\n`, /base-fingerprint must be "none" or what `kscinc migrate fingerprint BASE` printed/],
      [`    repo: /r\n    token: ${'ab'.repeat(16)}\n`, /token belongs to a replicate job/],
      [`    repo: /r\n    tls-psk: /k\n`, /tls-psk belongs to a replicate job/],
    ];
    for (const [extra, re] of bad) expect(() => parse(job(extra)), extra).toThrow(re);
    expect(() => parse(`jobs:\n  - name: s\n    images: ["/v/*.ksc"]\n    when: every 1 day at 02:00\n    replicate: nbd://h/vm\n`)).toThrow(/images must be one path/);
  });

  it('runs one cycle per run; the second sends only the delta; the replica is identical', async () => {
    const r = rig();
    makeBaseAndOverlay(r, 'vm.ksc', 8);
    expect(r.cli(['create', 'dst.ksc', '--backing', 'base.raw']).code).toBe(0);
    const dst = await serveImage(r, 'dst.ksc', ['--incoming']);
    const cfg = join(r.dir, 'schedule.yaml');
    writeFileSync(cfg, job(`    replicate: ${dst.uri}\n    token: ${dst.token}\n`).replace('/v/vm.ksc', join(r.dir, 'vm.ksc')));
    const clock = new StepClock(Date.parse('2026-03-01T01:59:00Z'));
    const sent: number[] = [];
    const log: string[] = [];
    const daemon = new ScheduleDaemon(
      parseConfigText(readFileSync(cfg, 'utf8'), cfg),
      {
        clock,
        log: (l) => log.push(l),
        backupImage: () => Promise.reject(new Error('no backups here')),
        prune: () => Promise.reject(new Error('no prune here')),
        replicateImage: async (image, to, { token }) => {
          const s = await replicateOnce(image, { op: 'replicate-once', to, token });
          sent.push(s.lastCycle!.bytesSent);
          return { consistentAt: s.lastCycle!.consistentAt! };
        },
      },
      { maxSleepMs: 3_600_000 },
    );
    const done = daemon.run();
    try {
      await daemon.idle();
      await clock.advanceTo(Date.parse('2026-03-01T02:00:00Z'), daemon);
      writeFileSync(join(r.dir, 'more.bin'), Buffer.alloc(MiB, 0x5a));
      expect(r.cli(['write', 'vm.ksc', '20M', '--from', 'more.bin']).code).toBe(0);
      await clock.advanceTo(Date.parse('2026-03-02T02:00:00Z'), daemon);
    } finally {
      daemon.shutdown();
      await done;
      expect(await dst.stop()).toBe(0);
    }
    console.log(`schedule replicate: runs sent ${sent.join(', ')} bytes; ${log.filter((l) => l.includes('consistent at')).length} consistent point(s) logged`);
    expect(sent.length).toBe(2);
    expect(sent[0]).toBeGreaterThanOrEqual(8 * MiB);
    expect(sent[1]).toBe(MiB);
    const st = await readState(statePathFor(cfg));
    const last = st.jobs.standby!.lastRun!;
    expect(last.result).toBe('ok');
    expect(last.backups[0]!.id).toMatch(/^replica@\d{4}-\d\d-\d\dT/);
    sameBytes(rawOf(r, 'vm.ksc'), rawOf(r, 'dst.ksc'));
  });
});

/** A clock the test moves: sleeps end when the test advances past them. */
class StepClock implements Clock {
  private timers: { at: number; resolve: () => void }[] = [];
  constructor(private t: number) {}
  now = (): number => this.t;
  sleep = (ms: number, signal?: AbortSignal): Promise<void> =>
    new Promise<void>((resolve) => {
      if (signal?.aborted) return resolve();
      const tm = { at: this.t + ms, resolve };
      this.timers.push(tm);
      signal?.addEventListener('abort', () => ((this.timers = this.timers.filter((x) => x !== tm)), resolve()), { once: true });
    });
  /** Moves to `t`, wakes the sleepers due, and waits until the daemon is idle again. */
  async advanceTo(t: number, daemon: ScheduleDaemon): Promise<void> {
    this.t = t;
    const due = this.timers.filter((x) => x.at <= t);
    this.timers = this.timers.filter((x) => x.at > t);
    for (const x of due) x.resolve();
    await new Promise((res) => setTimeout(res, 20));
    await daemon.idle();
  }
}
