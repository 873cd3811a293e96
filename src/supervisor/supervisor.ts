/**
 * The supervisor of `kscinc serve` (README "Serving under the supervisor"): it owns the listening sockets
 * and runs the NBD server in a worker process (worker.ts). It reads no image and no NBD byte: every
 * accepted connection is passed, unread, to the worker serving now, or held until one is ready.
 *   - Crash restart: when the worker dies, a new one starts at once (backing off 0, 0.1, 1, 5 s on
 *     repeated crashes; after `maxRestarts` crashes within a minute the supervisor gives up and exits).
 *   - Hot upgrade (upgrade(), SIGHUP, the control op "upgrade"): a new worker is started from the code
 *     installed now and warmed up (warmup.ts); the old one flushes while still serving, parks its
 *     connections at request boundaries, sends them here at once (held until the new worker is ready) and
 *     hands the images over (flushed, the last sync left to the new worker, no intent bit cleared:
 *     formats/ksc_inc.md §9 rule 11); the new one opens them and adopts every connection, socket and
 *     negotiated state. Only drain → close → open → adopt is serialized (the pause). If the new one fails
 *     to start or to open, the old one reopens and the connections go back to it.
 */
import type { Socket } from 'node:net';
import { KscError } from '../errors.js';
import type { ServeConfig } from '../cli/serve-open.js';
import { logLinesDropped } from '../cli/log-sink.js';
import type { PullStatus } from '../engines/pull-background.js';
import type { HandoverRecord } from '../image/ksc.js';
import { Child } from './child.js';
import { Spare } from './spare.js';
import type { FromWorker } from './protocol.js';
import { Relay, markPhase } from './relay.js';
import { supervisorKillPoint, supervisorKillPointNow } from './killpoint.js';
import { restartBackoffMs } from './backoff.js';

export interface UpgradeResult {
  version: { from: string; to: string };
  /** Longest time a client request could wait because of the handover: from parking to the last adoption. */
  pauseMs: number;
  connections: number;
  /**
   * Where the time went (ms, diagnostics; formats/control.md §2.1): `start` = forking the new worker until
   * it had loaded and `warm` = its warm-up, `preFlush` = the old worker's flush while still serving (all
   * before the pause); then from the moment the old worker was told to park: `drain` (old:
   * connections stopped at request boundaries, in-flight replied), `close` (old: flush + close the images),
   * `parked` (the supervisor heard it), `open` (new: opening the images), `ready` (the supervisor heard it),
   * `adopted` (the last connection adopted by the new worker = pauseMs).
   */
  phasesMs?: Record<string, number>;
  /** When the pause began (the old worker stopped reading), ms since the epoch (diagnostics, for benches). */
  pausedAt?: number;
}

export interface StatusResult {
  supervisor: { pid: number; startedAt: string; uptimeMs: number } | null;
  worker: { pid: number; version: string; startedAt: string; uptimeMs: number } | null;
  connections: number;
  inFlight: number;
  restarts: number;
  lastUpgrade: (UpgradeResult & { at: string }) | null;
  /** The background pull of each served live restore (formats/control.md §5). */
  pulls?: PullStatus[];
  /** Log lines dropped because the reader of stderr fell behind: this supervisor's and its worker's now (docs/cli.md "Logs"). */
  logDropped?: number;
}

export interface SupervisorOptions {
  config: ServeConfig;
  log: (line: string) => void;
  /** Crashes within a minute after which the supervisor gives up (default 10). */
  maxRestarts?: number;
  /** Called once when the supervisor gives up restarting; it should shut down. */
  onGiveUp: (why: string) => void;
}

type Held = { kind: 'conn'; sock: Socket } | { kind: 'control'; sock: Socket; line: string; index: number };

const LOAD_MS = 30_000;
const OPEN_MS = 120_000;
const WARM_MS = 10_000;
const PARK_MS = 120_000;
/** Handover diagnostics (KSCINC_DEBUG=handover or 1). */
const DEBUG = /\b(1|handover)\b/.test(process.env.KSCINC_DEBUG ?? '');

export class Supervisor {
  private worker: Child | null = null;
  private readonly held: Held[] = [];
  /** Connections are held (not passed on) while set: no worker, or a handover running. */
  private holding = true;
  private crashes: number[] = [];
  /** Delays before a restart (BACKOFF_MS unless a test sets its own). */
  private readonly backoff = restartBackoffMs();
  private restartTimer: NodeJS.Timeout | null = null;
  private restarting = false;
  private upgrading: Promise<UpgradeResult> | null = null;
  private stopped = false;
  private restarts = 0;
  private lastUpgrade: (UpgradeResult & { at: string }) | null = null;
  private readonly startedAt = new Date();
  private statsId = 0;
  private connId = 0;
  /**
   * New connections sent to a worker that has not yet said it took them: the supervisor keeps its copy of
   * each, so one sent to a worker that dies before taking it goes to the next worker instead of being lost.
   */
  private readonly inTransit = new Map<number, { h: Held & { kind: 'conn' }; w: Child }>();

  /** A worker started in advance for the next crash restart (spare.ts). */
  private readonly spare: Spare;

  constructor(private readonly opts: SupervisorOptions) {
    this.spare = new Spare(opts.log);
  }

  /** Starts the first worker and opens the images; rejects with the worker's error (then nothing runs). */
  async start(): Promise<void> {
    if (process.env.KSCINC_TEST_RESTART_BACKOFF_MS !== undefined) this.opts.log(`kscinc serve: test setting in force: restart delays ${this.backoff.join(', ')} ms (KSCINC_TEST_RESTART_BACKOFF_MS)`);
    const w = await this.launch();
    this.adoptAsCurrent(w);
  }

  /** A new NBD connection from a listener (paused, nothing read). */
  connection(sock: Socket): void {
    sock.on('error', () => undefined);
    this.dispatch({ kind: 'conn', sock });
  }

  /** A control request the supervisor does not answer itself (a backup), with its line already read. */
  control(sock: Socket, line: string, index: number): void {
    this.dispatch({ kind: 'control', sock, line, index });
  }

  private dispatch(h: Held): void {
    if (this.stopped) {
      h.sock.destroy();
      return;
    }
    if (this.holding || !this.worker) {
      this.held.push(h);
      return;
    }
    this.pass(this.worker, h);
  }

  private pass(w: Child, h: Held): void {
    if (h.sock.destroyed) return;
    if (!w.alive || !w.proc.connected) {
      this.held.push(h); // dying: the next worker gets it
      return;
    }
    untrack(h.sock);
    if (h.kind === 'conn') {
      const id = ++this.connId;
      this.inTransit.set(id, { h, w });
      w.send({ t: 'conn', id }, h.sock, true);
    } else w.send({ t: 'control', index: h.index, line: h.line }, h.sock);
  }

  private release(): void {
    this.holding = false;
    const w = this.worker;
    for (const h of this.held.splice(0)) {
      if (w) this.pass(w, h);
      else h.sock.destroy();
    }
  }

  /** Has the spare worker, or else a new one, open the images; kills it and rejects when a step fails. */
  private async launch(): Promise<Child> {
    const spare = this.spare.take();
    const w = spare ?? new Child();
    try {
      if (!spare) {
        const loaded = await w.next(['loaded'], LOAD_MS, 'starting');
        if (loaded.t === 'loaded') w.version = loaded.version;
      } else this.opts.log(`kscinc serve: the spare worker ${w.pid} opens the images`);
      w.send({ t: 'open', config: this.opts.config });
      await w.next(['ready'], OPEN_MS, 'opening the images');
      return w;
    } catch (e) {
      await w.kill();
      throw e;
    }
  }

  /** A worker took a connection: drop our copy (closing one descriptor of it; the connection stays open). */
  private took(m: FromWorker): void {
    if (m.t !== 'took') return;
    const e = this.inTransit.get(m.id);
    if (!e) return;
    this.inTransit.delete(m.id);
    e.h.sock.destroy();
  }

  /** Connections sent to `w` and not taken: back in the queue for the next worker. */
  private requeue(w: Child): void {
    for (const [id, e] of this.inTransit) {
      if (e.w !== w) continue;
      this.inTransit.delete(id);
      this.held.push(e.h);
    }
    if (!this.holding && this.worker && this.worker !== w && this.worker.alive) this.release();
  }

  private adoptAsCurrent(w: Child): void {
    this.worker = w;
    w.onMessage = (m) => this.took(m);
    void w.exited.then((how) => this.workerExited(w, how));
    this.release();
    this.spare.refill();
  }

  private workerExited(w: Child, how: string): void {
    this.requeue(w);
    if (this.worker !== w || this.stopped || this.upgrading) return;
    this.worker = null;
    this.holding = true;
    this.opts.log(`kscinc serve: worker ${w.pid} ${how}; restarting it`);
    this.crashed();
  }

  /** Counts a crash and schedules the next worker, or gives up. */
  private crashed(): void {
    const now = Date.now();
    this.crashes = this.crashes.filter((t) => now - t < 60_000);
    this.crashes.push(now);
    const max = this.opts.maxRestarts ?? 10;
    if (this.crashes.length > max) {
      const why = `the worker died ${this.crashes.length} times within a minute (more than ${max}); giving up`;
      this.opts.log(`kscinc serve: ${why}`);
      this.stopped = true;
      void this.spare.drop(true);
      for (const h of this.held.splice(0)) h.sock.destroy();
      this.opts.onGiveUp(why);
      return;
    }
    const delay = this.backoff[Math.min(this.crashes.length - 1, this.backoff.length - 1)]!;
    const t0 = performance.now();
    this.restartTimer = setTimeout(() => {
      this.opts.log(`kscinc serve: restarting the worker ${Math.round(performance.now() - t0)} ms after the crash (back-off ${delay} ms)`);
      void this.restart();
    }, delay);
  }

  private async restart(): Promise<void> {
    this.restartTimer = null;
    if (this.stopped || this.restarting) return;
    this.restarting = true;
    try {
      const w = await this.launch();
      this.restarting = false;
      if (this.stopped) {
        w.send({ t: 'stop' });
        return;
      }
      this.restarts++;
      this.opts.log(`kscinc serve: worker ${w.pid} serving`);
      this.adoptAsCurrent(w);
    } catch (e) {
      this.restarting = false;
      this.opts.log(`kscinc serve: a new worker failed: ${(e as Error).message}`);
      if (!this.stopped) this.crashed();
    }
  }

  /** Hot upgrade; one at a time. */
  upgrade(): Promise<UpgradeResult> {
    if (this.upgrading) return Promise.reject(new KscError('KSC_E_LOCKED', 'an upgrade is already running'));
    if (this.stopped) return Promise.reject(new KscError('KSC_E_CLOSED', 'the server is stopping'));
    if (!this.worker || this.holding) return Promise.reject(new KscError('KSC_E_UNAVAILABLE', 'no worker is serving now (restarting after a crash); try again'));
    this.upgrading = this.handover(this.worker).finally(() => {
      this.upgrading = null;
      // A worker that died while the handover ran is restarted now.
      if (!this.stopped && (!this.worker || !this.worker.alive) && !this.restarting && !this.restartTimer) {
        this.worker = null;
        this.holding = true;
        this.crashed();
      }
    });
    return this.upgrading;
  }

  private async handover(old: Child): Promise<UpgradeResult> {
    this.opts.log(`kscinc serve: upgrade: starting a new worker (old: ${old.pid}, version ${old.version})`);
    const phases: Record<string, number> = {};
    const neu = await this.startWarm(old, phases);
    this.holding = true; // new connections wait in the supervisor from here
    // The old worker flushes while serving, says `parking`, stops reading, sends each connection at once
    // (`handoff`; held here until the new worker has opened the images), flushes and closes the images and
    // says `parked`.
    const relay = new Relay(neu);
    old.onMessage = (m, handle) => {
      this.took(m);
      if (m.t === 'parking') {
        relay.t0 = performance.now();
        supervisorKillPointNow('parking', old, neu);
      } else if (m.t === 'handoff') {
        relay.take(handle as Socket | undefined, m.state, m.pending, this.opts.log, DEBUG);
        supervisorKillPointNow('handoff', old, neu);
      }
    };
    neu.onMessage = (m) => {
      this.took(m);
      if (m.t === 'adopted') relay.adopted();
    };
    const parked = await this.park(old, neu, relay);
    markPhase(phases, 'parked', relay.t0);
    await supervisorKillPoint('parked', old, neu);
    if (parked.t === 'parked') {
      if (parked.preFlushMs !== undefined) phases.preFlush = parked.preFlushMs;
      if (parked.drainMs !== undefined) phases.drain = parked.drainMs;
      if (parked.closeMs !== undefined) phases.close = parked.closeMs;
    }
    this.opts.log(`kscinc serve: upgrade: old worker ${old.pid} ${old.alive ? `parked ${parked.t === 'parked' ? parked.connections : 0} connection(s) and closed the images` : old.exitedWith}`);
    // The old worker has closed the images (or is dead): the new one opens them.
    await this.openInNew(old, neu, relay, phases, parked.t === 'parked' ? parked.handover : undefined);
    await supervisorKillPoint('ready', old, neu);
    return this.completeHandover(old, neu, relay, phases);
  }

  /** Starts the new worker and warms it up while the old one still serves (a failed warm-up only leaves it cold). */
  private async startWarm(old: Child, phases: Record<string, number>): Promise<Child> {
    const tStart = performance.now();
    const neu = new Child();
    try {
      const loaded = await neu.next(['loaded'], LOAD_MS, 'starting');
      if (loaded.t === 'loaded') neu.version = loaded.version;
      markPhase(phases, 'start', tStart);
      await supervisorKillPoint('loaded', old, neu);
      const tWarm = performance.now();
      const p = neu.next(['warmed'], WARM_MS, 'warming up').catch((e: unknown) => {
        if (!neu.alive) throw e;
        return null;
      });
      neu.send({ t: 'warm' });
      const warmed = await p;
      markPhase(phases, 'warm', tWarm);
      await supervisorKillPoint('warmed', old, neu);
      if (warmed?.t === 'warmed' && warmed.error) this.opts.log(`kscinc serve: upgrade: the new worker's warm-up failed (it serves all the same): ${warmed.error}`);
      return neu;
    } catch (e) {
      this.opts.log(`kscinc serve: upgrade: the new worker failed to start: ${(e as Error).message}`);
      await neu.kill();
      throw new KscError('KSC_E_IO', `upgrade: the new worker failed to start (${(e as Error).message}); the old one (${old.pid}) keeps serving`);
    }
  }

  /** Asks the old worker to park; on refusal or a live worker's failure the upgrade is off and it keeps serving. */
  private async park(old: Child, neu: Child, relay: Relay): Promise<FromWorker> {
    let parked: FromWorker;
    try {
      const p = old.next(['parked', 'park-refused'], PARK_MS, 'parking its connections');
      old.send({ t: 'park' });
      parked = await p;
    } catch (e) {
      if (old.alive) {
        await neu.kill();
        relay.drop();
        this.release();
        throw e;
      }
      parked = { t: 'parked', connections: relay.heldCount }; // the old worker died: the connections it sent go on
    }
    if (parked.t === 'park-refused') {
      await neu.kill();
      this.release();
      throw new KscError('KSC_E_LOCKED', `upgrade refused: ${parked.message}; try again when it has finished`);
    }
    return parked;
  }

  /** The new worker opens the images; if it cannot, the old one reopens them and gets its connections back. */
  private async openInNew(old: Child, neu: Child, relay: Relay, phases: Record<string, number>, handover?: (HandoverRecord | null)[]): Promise<void> {
    neu.send({ t: 'open', config: this.opts.config, handover, upgrade: true });
    try {
      const ready = await neu.next(['ready'], OPEN_MS, 'opening the images');
      if (ready.t === 'ready' && ready.openMs !== undefined) phases.open = ready.openMs;
      markPhase(phases, 'ready', relay.t0);
      return;
    } catch (e) {
      await neu.kill();
      const why = (e as Error).message;
      this.opts.log(`kscinc serve: upgrade: the new worker failed to open the images: ${why}${old.alive ? '; the old worker reopens them' : ''}`);
      let back = false;
      if (old.alive) {
        old.send({ t: 'resume' });
        try {
          await old.next(['resumed'], OPEN_MS, 'reopening the images');
          back = true;
        } catch (e2) {
          this.opts.log(`kscinc serve: upgrade: the old worker failed to resume: ${(e2 as Error).message}`);
        }
      }
      // The connections go back to the old worker (or, when it cannot serve, are closed: the clients reconnect).
      relay.giveBack(back ? old : null);
      old.onMessage = (m, handle) => {
        this.took(m);
        if (m.t === 'handoff') (handle as Socket | undefined)?.destroy(); // a dead old worker's last: the client reconnects
      };
      if (back) this.release();
      throw new KscError('KSC_E_IO', `upgrade: the new worker failed to open the images (${why}); the old one (${old.pid}) keeps serving`);
    }
  }

  /** Hands the held connections to the new worker, waits for their adoption, and makes it the worker. */
  private async completeHandover(old: Child, neu: Child, relay: Relay, phases: Record<string, number>): Promise<UpgradeResult> {
    // Every `handoff` came before `parked` (messages with a socket are delivered in order), so the ones held
    // now are all there are.
    relay.forwardAll();
    old.send({ t: 'exit' });
    await supervisorKillPoint('forwarded', old, neu);
    let timer: NodeJS.Timeout | null = null;
    await Promise.race([relay.allAdopted(), neu.exited, new Promise((r) => (timer = setTimeout(r, PARK_MS)))]);
    clearTimeout(timer!);
    const t0 = relay.t0;
    const pauseMs = Math.round(performance.now() - t0);
    markPhase(phases, 'adopted', t0);
    await supervisorKillPoint('adopted', old, neu);
    await old.exited.catch(() => undefined);
    // old.onMessage stays: a connection an old worker that died sent just before (its message read after its
    // exit) still goes to the new worker.
    const pausedAt = Math.round((performance.timeOrigin + t0) * 10) / 10;
    const result: UpgradeResult = { version: { from: old.version, to: neu.version }, pauseMs, connections: relay.adoptedCount, phasesMs: phases, pausedAt };
    this.lastUpgrade = { ...result, at: new Date().toISOString() };
    this.worker = neu;
    neu.onMessage = (m) => this.took(m);
    void neu.exited.then((how) => this.workerExited(neu, how));
    if (neu.alive) this.release();
    // The spare runs the code of before the upgrade: a new one, of the code installed now.
    void this.spare.drop().then(() => this.spare.refill());
    this.opts.log(
      `kscinc serve: upgrade: worker ${neu.pid} (version ${neu.version}) serving ${relay.adoptedCount} connection(s); pause ${pauseMs} ms (${Object.entries(phases)
        .map(([k, v]) => `${k} ${v}`)
        .join(', ')})`,
    );
    return result;
  }

  async status(): Promise<StatusResult> {
    const w = this.worker;
    let connections = 0;
    let inFlight = 0;
    let pulls: PullStatus[] = [];
    let logDropped = logLinesDropped();
    if (w && w.alive && !this.upgrading) {
      const id = ++this.statsId;
      const got = w.next(['stats'], 5000, 'stats').catch(() => null);
      w.send({ t: 'stats', id });
      const s = await got;
      if (s && s.t === 'stats') {
        ({ connections, inFlight, pulls = [] } = s);
        logDropped += s.logDropped ?? 0;
      }
    }
    const now = Date.now();
    return {
      supervisor: { pid: process.pid, startedAt: this.startedAt.toISOString(), uptimeMs: now - this.startedAt.getTime() },
      worker: w ? { pid: w.pid, version: w.version, startedAt: w.startedAt.toISOString(), uptimeMs: now - w.startedAt.getTime() } : null,
      connections,
      inFlight,
      restarts: this.restarts,
      lastUpgrade: this.lastUpgrade,
      pulls,
      logDropped,
    };
  }

  /** Stops: the worker finishes in-flight requests, flushes and closes the images. */
  async stop(): Promise<void> {
    this.stopped = true;
    if (this.restartTimer) clearTimeout(this.restartTimer);
    await this.spare.drop(true);
    for (const h of this.held.splice(0)) h.sock.destroy();
    await this.upgrading?.catch(() => undefined);
    for (const { h } of this.inTransit.values()) h.sock.destroy();
    this.inTransit.clear();
    const w = this.worker;
    if (w && w.alive) {
      w.send({ t: 'stop' });
      await w.exited;
    }
  }
}

/**
 * Makes the listener forget a socket we pass to a worker. Node would otherwise track it "in the worker"
 * (for the cluster module), and server.close() would wait for that worker to report it closed — forever
 * once the worker is gone. Counted out of the listener's connections, as Node does for a socket it sends.
 */
function untrack(sock: Socket): void {
  const s = sock as unknown as { server: { _connections: number } | null; _server: unknown };
  if (s.server) {
    s.server._connections--;
    s.server = null;
    s._server = null;
  }
}
