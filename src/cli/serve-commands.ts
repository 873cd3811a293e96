/**
 * kscinc serve: images as NBD exports until SIGTERM/SIGINT — under a supervisor that owns the sockets and
 * runs the server in a worker process (src/supervisor/), or in this one process with --no-supervisor.
 * kscinc status / kscinc upgrade: ask a running server, through its control socket.
 */
import * as path from 'node:path';
import type { Socket, Server } from 'node:net';
import type { Command } from 'commander';
import { KscError, isKscError } from '../errors.js';
import { NbdServer, type ListenAddress, type ListenTarget } from '../nbd/server.js';
import { printJson, println } from './output.js';
import { logLinesDropped, logSink, outputSink } from './log-sink.js';
import { controlPath } from './control-trust.js';
import { controlRequest, startControl } from './control.js';
import { failRequest, listenControl, requestOp, sendMessage } from './control-socket.js';
import { closeDevices, openExports, type ServeConfig } from './serve-open.js';
import { inheritedSockets, listenPaused } from '../supervisor/listeners.js';
import { Supervisor, type StatusResult, type UpgradeResult } from '../supervisor/supervisor.js';
import { packageVersion } from '../supervisor/version.js';
import { ServePulls, printPull, pullRetryMs } from './pull-control.js';
import { prepareFromBackup } from './serve-from-backup.js';
import { parseSize } from '../util/size.js';
import { loadServerTls } from '../nbd/tls.js';
import { addServeTlsOptions, serveTls, type ServeTlsOptions } from './tls-options.js';

/** "HOST:PORT", "[v6]:PORT" or ":PORT". */
export function parseListen(text: string): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:]*)):(\d+)$/.exec(text);
  const port = m ? Number(m[3]) : NaN;
  if (!m || !Number.isInteger(port)) throw new KscError('KSC_E_INVALID', `--listen "${text}": expected HOST:PORT`);
  if (port > 65535) throw new KscError('KSC_E_INVALID', `--listen "${text}": port ${m[3]} is out of range (0–65535)`);
  return { host: m[1] ?? (m[2] || '127.0.0.1'), port };
}

/** 127.0.0.0/8, ::1 and ::ffff:127.x: only this host can connect. */
export function isLoopback(host: string): boolean {
  return /^127\.\d+\.\d+\.\d+$/.test(host) || host === '::1' || /^::ffff:127\./i.test(host) || host === 'localhost';
}

function uriHost(host: string): string {
  return host.includes(':') ? `[${host}]` : host;
}

interface ServeOptions extends ServeTlsOptions {
  backing?: string;
  listen?: string;
  socket?: string;
  exportName?: string;
  readOnly?: boolean;
  description?: string;
  bitmap?: string[];
  maxConnections?: number;
  shutdownGrace?: number;
  supervisor?: boolean;
  maxRestarts?: number;
  bandwidth?: string;
  pull?: boolean;
  pullRetry?: number;
  fromBackup?: string[];
  overlay?: string;
  disk?: string;
  incoming?: boolean;
  tokenFile?: string;
  force?: boolean;
}

function positiveInt(flag: string): (v: string) => number {
  return (v) => {
    const n = Number(v);
    if (!/^\d+$/.test(v) || !Number.isSafeInteger(n) || n < 1) throw new KscError('KSC_E_INVALID', `${flag} "${v}": expected a whole number ≥ 1`);
    return n;
  };
}

/** The server's log: never blocks serving (src/cli/log-sink.ts). */
const log = (l: string): void => logSink('kscinc serve').line(l);
/** What it prints on stdout for scripts (URIs, the incoming token): never blocks serving, never dropped. */
const out = (l: string): void => outputSink('kscinc serve').line(l);

/** The URIs (nbds:// with TLS), a warning for plain NBD on a non-loopback address, "ready". */
function announce(addr: ListenAddress, names: string[], tls: boolean): void {
  if (!('path' in addr) && !isLoopback(addr.host) && !tls) {
    log(
      `kscinc serve: WARNING: listening on ${addr.host}, not a loopback address, without TLS (--insecure): anyone who can reach it may read and write these images; use --tls-cert/--tls-key/--tls-ca or --tls-psk unless the network is trusted`,
    );
  }
  const s = tls ? 's' : '';
  for (const name of names) {
    const enc = encodeURIComponent(name);
    out('path' in addr ? `nbd${s}+unix:///${enc}?socket=${addr.path}` : `nbd${s}://${uriHost(addr.host)}:${addr.port}/${enc}`);
  }
  log(`kscinc serve: ready (${names.length} export${names.length === 1 ? '' : 's'})`);
}

function untilSignal(onHup?: () => void): { stopped: Promise<string>; giveUp: (why: string) => void } {
  let giveUp: (why: string) => void = () => undefined;
  const stopped = new Promise<string>((resolve) => {
    process.once('SIGTERM', () => resolve('SIGTERM'));
    process.once('SIGINT', () => resolve('SIGINT'));
    giveUp = (why) => resolve(`give-up: ${why}`);
  });
  if (onHup) process.on('SIGHUP', onHup);
  return { stopped, giveUp };
}

/** Today's single process: open, listen, serve. */
async function serveAlone(c: ServeConfig, target: ListenTarget, what: string): Promise<void> {
  const { devices, exports } = await openExports(c);
  let server: NbdServer;
  try {
    server = new NbdServer({ exports, log, maxConnections: c.maxConnections, shutdownGraceMs: c.shutdownGraceMs, tls: loadServerTls(c.tls) });
  } catch (e) {
    await closeDevices(devices);
    throw e;
  }
  let addr;
  try {
    addr = await server.listen(target);
  } catch (e) {
    await closeDevices(devices);
    throw new KscError('KSC_E_IO', `cannot listen on ${what}: ${(e as Error).message}`, { cause: e });
  }
  const startedAt = new Date();
  const pulls = new ServePulls(c.pull, () => server.inFlight > 0, log);
  pulls.start(c.images, devices);
  let stopControl: () => Promise<void> = async () => undefined;
  if (!c.readOnly) {
    // Not owning the control socket is fatal: someone else's socket would answer `kscinc backup` for us.
    try {
      stopControl = await startControl(
        c.images.map((image, i) => ({ image, device: devices[i]! })),
        log,
        {
          other: (sock, _line, op) => {
            if (op === 'status') {
              const now = Date.now();
              const r: StatusResult = {
                supervisor: null,
                worker: { pid: process.pid, version: packageVersion(), startedAt: startedAt.toISOString(), uptimeMs: now - startedAt.getTime() },
                connections: server.connections,
                inFlight: server.inFlight,
                restarts: 0,
                lastUpgrade: null,
                pulls: pulls.status(),
                logDropped: logLinesDropped(),
              };
              sendMessage(sock, { result: r });
              sock.end();
              return true;
            }
            if (op === 'upgrade') {
              failRequest(sock, 'KSC_E_INVALID', 'this server runs without a supervisor (--no-supervisor): it cannot be upgraded in place; restart it');
              return true;
            }
            return false;
          },
        },
      );
    } catch (e) {
      await server.close();
      await pulls.stop();
      await closeDevices(devices);
      throw e;
    }
  }
  announce(addr, c.names, !!c.tls);
  const { stopped } = untilSignal();
  const sig = await stopped;
  log(`kscinc serve: ${sig}: finishing in-flight requests`);
  await stopControl();
  await server.close();
  await pulls.stop();
  await closeDevices(devices);
  log('kscinc serve: images flushed and closed');
}

/** The supervisor: listen, start the worker, answer status/upgrade, pass the rest on. */
async function serveSupervised(c: ServeConfig, target: ListenTarget, what: string, maxRestarts: number | undefined): Promise<void> {
  const signals = untilSignal(() => {
    log('kscinc serve: SIGHUP: upgrading the worker');
    sup.upgrade().then(
      (r) => log(`kscinc serve: upgrade done: ${JSON.stringify(r)}`),
      (e: unknown) => log(`kscinc serve: upgrade failed: ${(e as Error).message}`),
    );
  });
  const sup: Supervisor = new Supervisor({ config: c, log, maxRestarts, onGiveUp: (why) => signals.giveUp(why) });
  let listener: { server: Server; address: ListenAddress };
  try {
    listener = await listenPaused(target, (s) => sup.connection(s), log);
  } catch (e) {
    throw new KscError('KSC_E_IO', `cannot listen on ${what}: ${(e as Error).message}`, { cause: e });
  }
  const closeListener = (): Promise<void> => new Promise((r) => listener.server.close(() => r()));
  try {
    await sup.start();
  } catch (e) {
    await closeListener();
    throw e;
  }
  let stopControl: () => Promise<void> = async () => undefined;
  if (!c.readOnly) {
    // Created once the worker holds the images' locks: a leftover socket of ours is then a dead server's.
    try {
      stopControl = await listenControl(c.images, (sock, line, index) => supervisorRequest(sup, sock, line, index), log);
    } catch (e) {
      await sup.stop();
      await closeListener();
      throw e;
    }
  }
  announce(listener.address, c.names, !!c.tls);
  const why = await signals.stopped;
  log(`kscinc serve: ${why}: finishing in-flight requests`);
  await stopControl();
  await sup.stop();
  await closeListener();
  log('kscinc serve: images flushed and closed');
  if (why.startsWith('give-up')) throw new KscError('KSC_E_IO', `serve stopped: ${why.slice(9)}`);
}

function supervisorRequest(sup: Supervisor, sock: Socket, line: string, index: number): void {
  const op = requestOp(line);
  if (op !== 'status' && op !== 'upgrade') return sup.control(sock, line, index);
  sock.on('error', () => undefined);
  const work: Promise<StatusResult | UpgradeResult> = op === 'status' ? sup.status() : sup.upgrade();
  work.then(
    (result) => {
      sendMessage(sock, { result });
      sock.end();
      sock.resume();
    },
    (e: unknown) => failRequest(sock, isKscError(e) ? e.code : 'KSC_E_IO', (e as Error).message),
  );
}

/** `--incoming`: one writable image; its token is printed on stdout (formats/migrate.md §5). */
async function incomingFor(images: string[], readOnly: boolean, tokenFile: string | undefined): Promise<ServeConfig['incoming']> {
  if (images.length !== 1 || readOnly) throw new KscError('KSC_E_INVALID', '--incoming needs exactly one image, served writable');
  const token = tokenFile !== undefined ? await (await import('./incoming-token.js')).tokenFromFile(tokenFile) : undefined;
  const inc = await (await import('./migrate-commands.js')).prepareIncoming(images[0]!, token);
  out(`incoming-token: ${inc.token}`);
  return inc;
}

export function registerServeCommands(program: Command): void {
  program
    .command('serve')
    .description('serve images over NBD (nbd://HOST:PORT/NAME) until SIGTERM or SIGINT; SIGHUP upgrades the worker in place')
    .argument('[images...]', 'raw or ksc_inc images (none with --from-backup)')
    .option('--listen <host:port>', 'TCP address (port 0 picks a free port)', '127.0.0.1:10809')
    .option('--socket <path>', 'listen on a unix socket instead of TCP')
    .option('--export-name <name>', "export name (one image only; default: empty, or each file's basename with several images)")
    .option('--read-only', 'refuse writes')
    .option('--description <text>', 'export description shown to clients')
    .option(
      '--bitmap <name>',
      'offer only this dirty bitmap as qemu:dirty-bitmap:NAME (repeatable; default: every bitmap of the image, including ones created while serving)',
      (v: string, prev: string[] | undefined) => [...(prev ?? []), v],
    )
    .option('--max-connections <n>', 'connections served at once; more are refused (default 64)', positiveInt('--max-connections'))
    .option('--shutdown-grace <seconds>', 'on SIGTERM, cut connections still busy after this long (a client that does not read; default 10)', positiveInt('--shutdown-grace'))
    .option('--no-supervisor', 'serve in this one process (no crash restart, no hot upgrade)')
    .option('--incoming', 'the target of a migration (formats/migrate.md §5): only the source holding the printed token may write until it completes')
    .option('--token-file <file>', 'with --incoming: keep the token in this file (created, mode 0600, when missing) so a restarted destination takes the same one')
    .option('--force', 'serve writable even an image migrated away to another host (a stale copy; formats/ksc_inc.md §4.1)')
    .option('--max-restarts <n>', 'give up after this many worker crashes within a minute (default 10)', positiveInt('--max-restarts'))
    .option('--bandwidth <rate>', 'live restores: read the rest of the backup from the repository at most this fast, bytes per second (200M, 1G)')
    .option('--no-pull', 'live restores: do not pull the rest of the backup in the background (reads still fetch what they need)')
    .option('--pull-retry <seconds>', 'live restores: after the pull failed (repository away past KSCINC_LIVE_TIMEOUT), try again after this long (default 30)', pullRetryMs)
    .option('--from-backup <repo-and-backup...>', 'REPO ID|latest: live-restore that backup to --overlay (unless it exists) and serve it')
    .option('--overlay <file>', 'with --from-backup: the local image the VM runs from')
    .option('--disk <uuid>', 'with --from-backup latest: the disk whose newest backup to use')
    .option('--backing <base>', "with --from-backup: a local copy of the disk's raw base (checked); only the overlay's chunks are fetched")
    .action(async (images: string[], o: ServeOptions) => {
      if (o.fromBackup) {
        if (images.length > 0) throw new KscError('KSC_E_INVALID', `--from-backup serves --overlay only: remove ${images.join(' ')}`);
        log(`kscinc serve: ${await prepareFromBackup(o.fromBackup, o.overlay, o.disk, o.backing)}`);
        images = [o.overlay!];
      } else if (o.overlay || o.disk || o.backing) throw new KscError('KSC_E_INVALID', '--overlay, --disk and --backing go with --from-backup');
      if (images.length === 0) throw new KscError('KSC_E_INVALID', 'serve needs at least one image (or --from-backup REPO ID --overlay FILE)');
      if (o.exportName !== undefined && images.length !== 1) throw new KscError('KSC_E_INVALID', '--export-name needs exactly one image');
      const names = images.map((img) => (images.length === 1 ? (o.exportName ?? '') : path.basename(img)));
      if (new Set(names).size !== names.length) throw new KscError('KSC_E_INVALID', 'two images have the same basename: export names must differ');
      const fds = inheritedSockets();
      const target: ListenTarget = fds.length > 0 ? { fd: fds[0]! } : o.socket ? { path: o.socket } : parseListen(o.listen ?? '127.0.0.1:10809');
      const what = fds.length > 0 ? `the socket systemd passed (fd ${fds[0]})` : (o.socket ?? o.listen ?? '127.0.0.1:10809');
      const tls = serveTls(o, 'host' in target ? target.host : null, isLoopback, !!o.incoming);
      const config: ServeConfig = {
        images,
        names,
        readOnly: !!o.readOnly,
        force: !!o.force,
        description: o.description,
        bitmap: o.bitmap,
        maxConnections: o.maxConnections,
        shutdownGraceMs: o.shutdownGrace !== undefined ? o.shutdownGrace * 1000 : undefined,
        pull: { enabled: o.pull !== false, bandwidth: o.bandwidth !== undefined ? bandwidth(o.bandwidth) : null, retryMs: o.pullRetry },
      };
      if (tls) config.tls = tls;
      if (o.tokenFile !== undefined && !o.incoming) throw new KscError('KSC_E_INVALID', '--token-file goes with --incoming');
      if (o.incoming) config.incoming = await incomingFor(images, config.readOnly, o.tokenFile);
      else if (!config.readOnly) for (const l of await (await import('./migrate-incoming.js')).settleCycleLogs(images, !!o.force)) log(l); // promotion of a replica (formats/migrate.md §11.7)
      if (config.incoming && o.incomingPeer !== undefined) config.incoming.peer = o.incomingPeer;
      if (o.supervisor === false) await serveAlone(config, target, what);
      else await serveSupervised(config, target, what, o.maxRestarts);
    });

  addServeTlsOptions(program.commands.find((c) => c.name() === 'serve')!);

  program
    .command('status')
    .description('what the server holding IMAGE runs: supervisor and worker, version, uptime, connections, restarts, last upgrade')
    .argument('<image>', 'an image a running `kscinc serve` holds')
    .option('--json', 'print JSON')
    .action(async (image: string, o: { json?: boolean }) => {
      const r = await ask<StatusResult>(image, { op: 'status' }, 'answering');
      if (o.json) return printJson(r);
      const up = (ms: number): string => `${(ms / 1000).toFixed(1)} s`;
      println(`supervisor:  ${r.supervisor ? `pid ${r.supervisor.pid}, up ${up(r.supervisor.uptimeMs)}` : 'none (--no-supervisor)'}`);
      println(`worker:      ${r.worker ? `pid ${r.worker.pid}, version ${r.worker.version}, up ${up(r.worker.uptimeMs)}` : 'none (restarting)'}`);
      println(`connections: ${r.connections}`);
      println(`in flight:   ${r.inFlight}`);
      println(`restarts:    ${r.restarts}`);
      if (r.logDropped !== undefined) println(`log dropped: ${r.logDropped} line(s) (the reader of the server's stderr fell behind or was gone)`);
      println(
        `last upgrade: ${r.lastUpgrade ? `${r.lastUpgrade.at}, ${r.lastUpgrade.version.from} -> ${r.lastUpgrade.version.to}, pause ${r.lastUpgrade.pauseMs} ms, ${r.lastUpgrade.connections} connection(s)` : 'none'}`,
      );
      printPull(image, r.pulls);
    });

  program
    .command('upgrade')
    .description('restart the server holding IMAGE on the kscinc code installed now, keeping every client connection')
    .argument('<image>', 'an image a running `kscinc serve` holds')
    .option('--json', 'print JSON')
    .action(async (image: string, o: { json?: boolean }) => {
      const r = await ask<UpgradeResult>(image, { op: 'upgrade' }, 'the upgrade finished');
      if (o.json) return printJson(r);
      println(`upgraded ${r.version.from} -> ${r.version.to}: ${r.connections} connection(s) kept, longest pause ${r.pauseMs} ms`);
    });
}

function bandwidth(v: string): number {
  const n = parseSize(v, '--bandwidth');
  if (n < 1) throw new KscError('KSC_E_INVALID', `--bandwidth "${v}": expected a rate above 0 bytes per second`);
  return n;
}

async function ask<R>(image: string, req: object, what: string): Promise<R> {
  const r = await controlRequest<R>(image, req, what);
  if (r === null) throw new KscError('KSC_E_NOT_FOUND', `no kscinc serve holds ${image} (no control socket at ${controlPath(image)}; read-only servers have none)`);
  return r;
}
