/**
 * The worker process of `kscinc serve` (started by the supervisor with child_process.fork): opens the
 * images, serves the NBD connections and control requests the supervisor passes it, and takes part in a
 * hot upgrade (protocol.ts): park its connections at request boundaries and close the images, then either
 * hand the connections back or reopen and resume. SIGINT/SIGTERM/SIGHUP are the supervisor's business: the
 * worker stops when told to, or when the supervisor goes away (the IPC channel closes).
 */
import type { Socket } from 'node:net';
import { isKscError } from '../errors.js';
import { BackupRequests } from '../cli/control.js';
import { UNREAD_LOG_GRACE_MS, logLinesDropped, logSink, settleLogs, tryFlushLogs } from '../cli/log-sink.js';
import { ServePulls } from '../cli/pull-control.js';
import { closeDevices, handOverDevices, openExports, type OpenedExports, type ServeConfig } from '../cli/serve-open.js';
import type { HandoverRecord } from '../image/ksc.js';
import { prepareHandOverOf } from '../image/open.js';
import { setWriteBehind } from '../io/file.js';
import { NbdServer } from '../nbd/server.js';
import { loadServerTls } from '../nbd/tls.js';
import { REQUEST_SIZE, decodeRequest } from '../nbd/wire.js';
import { packageVersion } from './version.js';
import { warmUp } from './warmup.js';
import { workerKillPoint } from './killpoint.js';
import { isMessage, type FromWorker, type ToWorker } from './protocol.js';

/** The worker's log: never blocks serving (src/cli/log-sink.ts). */
const log = (l: string): void => logSink('kscinc worker').line(l);
/** Handover diagnostics, with KSCINC_DEBUG=handover (or 1): what each connection carries across. */
const debug = /\b(1|handover)\b/.test(process.env.KSCINC_DEBUG ?? '') ? log : null;

/** "N unread byte(s)", and the cookie of the first request among them when its header is whole. */
function unread(pending: Buffer): string {
  const first = pending.length >= REQUEST_SIZE ? decodeRequest(pending) : null;
  return `${pending.length} unread byte(s)${first ? `, first request: type ${first.type} cookie ${first.cookie}` : ''}`;
}

/** A spare (spare.ts) is named so, in ps and /proc/PID/cmdline, until it opens images. */
const SPARE_TITLE = 'kscinc-spare';

const ms = (x: number): number => Math.round(x * 10) / 10;

/**
 * Write-behind for the served images (src/io/file.ts): their writeback starts after every this many bytes
 * written, so that no flush (a client's, or the pre-flush of a hot upgrade, which requests wait behind)
 * finds seconds of random writes still to be written. KSCINC_WRITE_BEHIND=bytes overrides it (0: off).
 */
const WRITE_BEHIND_BYTES = 1024 * 1024;
setWriteBehind(process.env.KSCINC_WRITE_BEHIND !== undefined ? Number(process.env.KSCINC_WRITE_BEHIND) : WRITE_BEHIND_BYTES);

function send(m: FromWorker, handle?: Socket): Promise<void> {
  return new Promise((resolve) => {
    if (!process.connected) return resolve();
    process.send!(m, handle as never, undefined, () => resolve());
  });
}

let config: ServeConfig | null = null;
let opened: OpenedExports | null = null;
let server: NbdServer | null = null;
let backups: BackupRequests | null = null;
let stopping: Promise<void> | null = null;
let pulls: ServePulls | null = null;
/** The records of this worker's own handover (park), for reopening when the upgrade fails (resume). */
let handedOver: (HandoverRecord | null)[] | null = null;

async function open(handover?: (HandoverRecord | null)[]): Promise<void> {
  const c = config!;
  opened = await openExports(c, handover);
  server = new NbdServer({ exports: opened.exports, log, maxConnections: c.maxConnections, shutdownGraceMs: c.shutdownGraceMs, tls: loadServerTls(c.tls) });
  const devices = c.images.map((image, i) => ({ image, device: opened!.devices[i]! }));
  if (backups) backups.setDevices(devices);
  else backups = new BackupRequests(devices, log);
  pulls = new ServePulls(c.pull, () => (server?.inFlight ?? 0) > 0, log);
  pulls.start(c.images, opened.devices);
}

async function fail(e: unknown): Promise<never> {
  await send({ t: 'failed', code: isKscError(e) ? e.code : 'KSC_E_IO', message: e instanceof Error ? e.message : String(e) });
  process.exit(1);
}

/** Finishes what is in flight, flushes and closes the images, then exits. */
function stop(): Promise<void> {
  stopping ??= (async () => {
    if (server) await server.close();
    await pulls?.stop();
    if (opened) await closeDevices(opened.devices);
    opened = null;
    await send({ t: 'stopped' });
    await settleLogs(UNREAD_LOG_GRACE_MS); // its last lines to a reader that is behind (a terminal), bounded
    process.exit(0);
  })();
  return stopping;
}

async function onMessage(m: ToWorker, handle: unknown): Promise<void> {
  const sock = handle as Socket | undefined;
  switch (m.t) {
    case 'open':
      if (process.title === SPARE_TITLE) process.title = 'kscinc-worker';
      config = m.config;
      try {
        const t = performance.now();
        await open(m.handover);
        if (m.upgrade) workerKillPoint('opened', 'new');
        await send({ t: 'ready', openMs: ms(performance.now() - t) });
      } catch (e) {
        return fail(e);
      }
      return;
    case 'warm': {
      const t = performance.now();
      let error: string | undefined;
      try {
        await warmUp();
      } catch (e) {
        error = (e as Error).message; // a cold worker serves all the same, only its first requests are slower
      }
      // The warm-up's garbage is collected now, while the old worker still serves, rather than by a GC that
      // would fall into the pause (the open and the first requests allocate).
      (globalThis as { gc?: () => void }).gc?.();
      await send({ t: 'warmed', ms: ms(performance.now() - t), error });
      return;
    }
    case 'conn':
      if (!sock) return;
      void send({ t: 'took', id: m.id }); // the supervisor may drop its copy now
      if (!server || stopping) sock.destroy();
      else server.accept(sock);
      return;
    case 'adopt':
      if (!sock) return;
      if (!server || stopping) sock.destroy();
      else {
        const pending = Buffer.from(m.pending, 'base64');
        debug?.(`kscinc worker ${process.pid}: adopting a connection with ${unread(pending)}`);
        workerKillPoint('adopting', 'new');
        server.adopt(sock, { state: m.state as never, pending });
        workerKillPoint('adopted-one', 'new');
      }
      await send({ t: 'adopted' });
      return;
    case 'control':
      if (!sock) return;
      if (!backups || stopping) sock.destroy();
      else backups.handle(sock, m.line, m.index);
      return;
    case 'stats':
      await send({
        t: 'stats',
        id: m.id,
        connections: server?.connections ?? 0,
        inFlight: server?.inFlight ?? 0,
        pulls: pulls?.status() ?? [],
        logDropped: logLinesDropped(),
      });
      return;
    case 'park': {
      const busy = backups?.running();
      if (busy || !server || !opened) {
        await send({ t: 'park-refused', message: busy ?? 'the worker is not serving' });
        return;
      }
      const t = performance.now();
      await pulls?.stop(); // before the pre-flush: what it filled is flushed with the rest; the new worker resumes it
      // Flushed while still serving, so that the flush in the pause below has only the last writes to make
      // durable; from here on no flush clears an intent bit (formats/ksc_inc.md §9 rule 11): the new worker
      // keeps every region set, and its first writes pay no intent sync where this one's did not.
      try {
        await Promise.all(opened.devices.map((d) => prepareHandOverOf(d)));
      } catch (e) {
        pulls?.start(config!.images, opened.devices);
        await send({ t: 'park-refused', message: `flushing before the handover failed: ${(e as Error).message}` });
        return;
      }
      const tPark = performance.now();
      workerKillPoint('preflushed', 'old');
      void send({ t: 'parking' });
      const list = await server.park();
      workerKillPoint('drained', 'old');
      const drainMs = ms(performance.now() - tPark);
      if (debug) for (const p of list) debug(`kscinc worker ${process.pid}: parked a connection with no request in flight, ${unread(p.pending)}`);
      server = null;
      // The connections leave now (the supervisor holds them until the new worker has opened the images), so
      // that their passing overlaps the flush and close below.
      const sent = list.map((p) => send({ t: 'handoff', state: p.state, pending: p.pending.toString('base64') }, p.socket));
      void Promise.all(sent).then(() => workerKillPoint('handed-off', 'old'));
      const devices = opened.devices;
      opened = null;
      // Handed over, not closed cleanly (formats/ksc_inc.md §9 rule 11): the next worker keeps the intent bits.
      handedOver = await handOverDevices(devices);
      workerKillPoint('closed', 'old');
      await send({ t: 'parked', connections: list.length, preFlushMs: ms(tPark - t), drainMs, closeMs: ms(performance.now() - tPark - drainMs), handover: handedOver });
      return;
    }
    case 'resume':
      try {
        await open(handedOver ?? undefined); // the new worker did not open them: the records still match
      } catch (e) {
        return fail(e);
      }
      await send({ t: 'resumed' });
      return;
    case 'exit':
      // At an upgrade the new worker takes connections now: what the log holds gets one non-blocking attempt.
      tryFlushLogs();
      process.exit(0);
      return;
    case 'stop':
      return stop();
  }
}

if (process.argv.includes('--spare')) process.title = SPARE_TITLE;
for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) process.on(sig, () => undefined);
process.on('disconnect', () => void stop());
process.on('message', (m: unknown, handle: unknown) => {
  if (!isMessage(m)) return;
  void onMessage(m as ToWorker, handle).catch((e: unknown) => {
    log(`kscinc worker: ${(e as Error).message}`);
    process.exit(1);
  });
});
void send({ t: 'loaded', version: packageVersion(), pid: process.pid });
