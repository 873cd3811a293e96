/**
 * kscinc migrate start|status|complete|cancel IMAGE: ask the `kscinc serve` holding IMAGE to migrate it
 * (formats/migrate.md §6); kscinc migrate fingerprint IMAGE: the base fingerprint of §2, for a destination
 * that cannot tell its own (qemu-nbd). Also what `kscinc serve --incoming` prepares before serving (§5).
 */
import type { Command } from 'commander';
import { KscError } from '../errors.js';
import { openImage } from '../image/open.js';
import { baseOf } from '../engines/migrate-base.js';
import type { MigrateStatus } from '../engines/migrate.js';
import { parseSize } from '../util/size.js';
import { controlRequest } from './control.js';
import { clientKey } from './control-key.js';
import { prepareIncomingImage } from './migrate-incoming.js';
import { controlPath } from './control-trust.js';
import { registerMigrateVm } from './migrate-vm-command.js';
import { formatSize, printJson, println } from './output.js';
import { addMigrateTlsOptions, migrateTls, type MigrateTlsOptions } from './tls-options.js';

/** For `serve --incoming`: a new token, the base fingerprint and the incoming id (migrate-incoming.ts). */
export const prepareIncoming = prepareIncomingImage;

async function ask<R>(image: string, req: object, what: string): Promise<R> {
  const r = await controlRequest<R>(image, req, what);
  if (r === null) throw new KscError('KSC_E_NOT_FOUND', `no kscinc serve holds ${image} (no control socket at ${controlPath(image)}): migrate runs inside the server`);
  return r;
}

function printStatus(s: MigrateStatus): void {
  println(`phase:       ${s.phase}`);
  println(`to:          ${s.to}`);
  println(`first pass:  ${formatSize(s.firstPassBytes)} above the base (disk ${formatSize(s.size)})`);
  println(`sent:        ${formatSize(s.bytesSent)} data, ${formatSize(s.bytesZeroed)} zeroed, ${s.rounds} round(s)`);
  println(`left:        ${formatSize(s.bytesLeft)} (estimated pause ${s.estimatedPauseMs < 0 ? 'unknown' : `${s.estimatedPauseMs} ms`})`);
  println(`rates:       ${formatSize(s.throughputBps)}/s sent, ${formatSize(s.dirtyRateBps)}/s dirtied`);
  if (s.seed)
    println(
      `seeded:      the destination holds backup ${s.seed.backup}; first pass from ${s.seed.via === 'bitmap' ? `bitmap ${s.seed.bitmap}` : `chunk hashes (${s.seed.chunksDiffer} of ${s.seed.chunks} chunks differ)`}`,
    );
  if (s.pauseMs !== null) println(`pause:       ${s.pauseMs} ms`);
  if (s.error) println(`error:       ${s.error.code}: ${s.error.message}`);
  if (s.warning) println(`warning:     ${s.warning}`);
}

interface StartOptions extends MigrateTlsOptions {
  to: string;
  token?: string;
  baseFingerprint?: string;
  bandwidth?: string;
  connections?: string;
  compress?: boolean;
  repo?: string;
  json?: boolean;
}

function registerStart(m: Command): void {
  const start = m.command('start');
  addMigrateTlsOptions(start)
    .description('start migrating IMAGE (served by kscinc serve) to an NBD export: what lies above the shared base, then the blocks written meanwhile')
    .argument('<image>', 'an image a running `kscinc serve` holds')
    .requiredOption('--to <uri>', 'destination: nbd[s]://HOST:PORT/EXPORT or nbd[s]+unix:///EXPORT?socket=PATH (nbds: TLS)')
    .option('--token <hex>', 'the incoming token the destination `kscinc serve --incoming` printed')
    .option('--base-fingerprint <text>', "the destination base's fingerprint (`kscinc migrate fingerprint BASE` there); needed when the destination is not kscinc")
    .option('--bandwidth <rate>', 'bytes per second at most (K/M/G)')
    .option('--connections <n>', 'NBD connections to the destination (1-16, default 2)')
    .option('--repo <location>', 'a destination restored from a backup: the repository that holds it (default: the one it recorded)')
    .option('--no-compress', 'never send lz4-compressed writes, even to a kscinc destination that takes them')
    .option('--json', 'print JSON')
    .action(async (image: string, o: StartOptions) => {
      const req = {
        op: 'migrate-start',
        to: o.to,
        token: o.token,
        baseFingerprint: o.baseFingerprint,
        bandwidth: o.bandwidth !== undefined ? parseSize(o.bandwidth, '--bandwidth') : undefined,
        connections: o.connections !== undefined ? Number(o.connections) : undefined,
        compress: o.compress === false ? false : undefined,
        tls: migrateTls(o, o.to),
        repo: o.repo,
        key: o.repo !== undefined ? await clientKey(o.repo) : undefined,
      };
      const s = await ask<MigrateStatus>(image, req, 'the migration started');
      if (o.json) printJson(s);
      else printStatus(s);
    });
}

function registerSimple(m: Command, name: 'status' | 'complete' | 'cancel', description: string): void {
  m.command(name)
    .description(description)
    .argument('<image>', 'an image a running `kscinc serve` holds')
    .option('--json', 'print JSON')
    .action(async (image: string, o: { json?: boolean }) => {
      const s = await ask<MigrateStatus>(image, { op: `migrate-${name}` }, `the migration's ${name} answered`);
      if (o.json) printJson(s);
      else printStatus(s);
    });
}

export function registerMigrateCommands(program: Command): void {
  const m = program.command('migrate').description("move a running VM's disk to another host's NBD export (formats/migrate.md)");
  registerStart(m);
  registerSimple(m, 'status', 'phase, bytes sent and left, rates, estimated pause of the migration of IMAGE');
  registerSimple(m, 'complete', 'switch over: hold new writes, send the rest, flush the destination; the source then refuses writes');
  registerSimple(m, 'cancel', 'stop the migration; the source goes on serving as before');
  registerMigrateVm(m); // the default subcommand: kscinc migrate IMAGE --to … --qmp … --vm-to … (formats/migrate.md §8)
  m.command('fingerprint')
    .description("print the fingerprint of IMAGE's base (the bottom of its chain; IMAGE itself when it has no backing)")
    .argument('<image>', 'an image or a base file')
    .action(async (image: string) => {
      const dev = await openImage(image);
      try {
        const b = baseOf(dev);
        const { fingerprintV1 } = await import('../engines/migrate-base.js');
        println(await fingerprintV1(b ? b.base : dev));
      } finally {
        await dev.close();
      }
    });
}
