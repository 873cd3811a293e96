/** kscinc serve: images as NBD exports until SIGTERM/SIGINT. */
import * as path from 'node:path';
import type { Command } from 'commander';
import { KscError } from '../errors.js';
import { KscImage } from '../image/ksc.js';
import { openImage } from '../image/open.js';
import type { BlockDevice } from '../image/types.js';
import { NbdServer, type NbdExport, type ListenTarget } from '../nbd/server.js';
import { println } from './output.js';
import { startControl } from './control.js';

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

interface ServeOptions {
  listen?: string;
  socket?: string;
  exportName?: string;
  readOnly?: boolean;
  description?: string;
  bitmap?: string[];
  maxConnections?: number;
  shutdownGrace?: number;
}

function positiveInt(flag: string): (v: string) => number {
  return (v) => {
    const n = Number(v);
    if (!/^\d+$/.test(v) || !Number.isSafeInteger(n) || n < 1) throw new KscError('KSC_E_INVALID', `${flag} "${v}": expected a whole number ≥ 1`);
    return n;
  };
}

export function registerServeCommands(program: Command): void {
  program
    .command('serve')
    .description('serve images over NBD (nbd://HOST:PORT/NAME) until SIGTERM or SIGINT')
    .argument('<images...>', 'raw or ksc_inc images')
    .option('--listen <host:port>', 'TCP address (port 0 picks a free port)', '127.0.0.1:10809')
    .option('--socket <path>', 'listen on a unix socket instead of TCP')
    .option('--export-name <name>', 'export name (one image only; default: empty, or each file\'s basename with several images)')
    .option('--read-only', 'refuse writes')
    .option('--description <text>', 'export description shown to clients')
    .option('--bitmap <name>', 'offer only this dirty bitmap as qemu:dirty-bitmap:NAME (repeatable; default: every bitmap of the image, including ones created while serving)', (v: string, prev: string[] | undefined) => [...(prev ?? []), v])
    .option('--max-connections <n>', 'connections served at once; more are refused (default 64)', positiveInt('--max-connections'))
    .option('--shutdown-grace <seconds>', 'on SIGTERM, cut connections still busy after this long (a client that does not read; default 10)', positiveInt('--shutdown-grace'))
    .action(async (images: string[], o: ServeOptions) => {
      if (o.exportName !== undefined && images.length !== 1) throw new KscError('KSC_E_INVALID', '--export-name needs exactly one image');
      const target: ListenTarget = o.socket ? { path: o.socket } : parseListen(o.listen ?? '127.0.0.1:10809');
      const names = images.map((img) => (images.length === 1 ? (o.exportName ?? '') : path.basename(img)));
      if (new Set(names).size !== names.length) throw new KscError('KSC_E_INVALID', 'two images have the same basename: export names must differ');
      const devices: BlockDevice[] = [];
      const closeAll = async (): Promise<void> => {
        for (const d of devices) {
          try {
            if (!d.readOnly) await d.flush();
          } finally {
            await d.close();
          }
        }
      };
      const exports = new Map<string, NbdExport>();
      let server: NbdServer;
      try {
        for (let i = 0; i < images.length; i++) {
          const dev = await openImage(images[i]!, { write: !o.readOnly });
          devices.push(dev);
          for (const b of o.bitmap ?? []) {
            if (!(dev instanceof KscImage) || !dev.hasBitmap(b)) throw new KscError('KSC_E_NOT_FOUND', `--bitmap ${b}: image ${images[i]} has no bitmap named "${b}"`);
          }
          exports.set(names[i]!, { device: dev, readOnly: !!o.readOnly, description: o.description, bitmaps: o.bitmap });
        }
        server = new NbdServer({
          exports, log: (l) => process.stderr.write(`${l}\n`),
          maxConnections: o.maxConnections, shutdownGraceMs: o.shutdownGrace !== undefined ? o.shutdownGrace * 1000 : undefined,
        });
      } catch (e) {
        await closeAll();
        throw e;
      }
      let addr;
      try {
        addr = await server.listen(target);
      } catch (e) {
        await closeAll();
        throw new KscError('KSC_E_IO', `cannot listen on ${o.socket ?? o.listen}: ${(e as Error).message}`, { cause: e });
      }
      let stopControl: () => Promise<void> = async () => undefined;
      if (!o.readOnly) {
        // Not owning the control socket is fatal: someone else's socket would answer `kscinc backup` for us.
        try {
          stopControl = await startControl(images.map((image, i) => ({ image, device: devices[i]! })), (l) => process.stderr.write(`${l}\n`));
        } catch (e) {
          await server.close();
          await closeAll();
          throw e;
        }
      }
      if (!('path' in addr) && !isLoopback(addr.host)) {
        process.stderr.write(`kscinc serve: WARNING: listening on ${addr.host}, not a loopback address: anyone who can reach it may read and write these images (NBD has no authentication here and TLS is not implemented yet); bind to 127.0.0.1 or use --socket unless the network is trusted\n`);
      }
      const stopped = new Promise<string>((resolve) => {
        process.once('SIGTERM', () => resolve('SIGTERM'));
        process.once('SIGINT', () => resolve('SIGINT'));
      });
      for (const name of names) {
        const enc = encodeURIComponent(name);
        println('path' in addr ? `nbd+unix:///${enc}?socket=${addr.path}` : `nbd://${uriHost(addr.host)}:${addr.port}/${enc}`);
      }
      process.stderr.write(`kscinc serve: ready (${images.length} export${images.length === 1 ? '' : 's'})\n`);
      const sig = await stopped;
      process.stderr.write(`kscinc serve: ${sig}: finishing in-flight requests\n`);
      await stopControl();
      await server.close();
      await closeAll();
      process.stderr.write('kscinc serve: images flushed and closed\n');
    });
}
