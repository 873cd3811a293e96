/**
 * kscinc migrate [whole] IMAGE --to nbd://H:P/EXPORT --qmp SOCKET --vm-to tcp:H:P: the VM and its disk in one
 * command (formats/migrate.md §8). The disk's migration runs in the source's `kscinc serve` (control socket,
 * §6); QEMU's runs in the source QEMU (QMP); the engine (src/engines/migrate-vm.ts) ties them together at
 * QEMU's pre-switchover. SIGINT/SIGTERM before the disk's switch-over cancel both.
 */
import type { Command } from 'commander';
import { KscError } from '../errors.js';
import { migrateVm, type StorageSide } from '../engines/migrate-vm.js';
import type { MigrateStatus } from '../engines/migrate.js';
import { Qmp } from '../qmp/client.js';
import { QmpVmMigration } from '../qmp/vm-migration.js';
import { controlRequest } from './control.js';
import { controlPath } from './control-trust.js';
import { printJson, println } from './output.js';
import { logSink } from './log-sink.js';
import type { MigrateStartRequest } from './migrate-control.js';
import { addStartRequestOptions, migrateStartRequest, type StartRequestOptions } from './migrate-request.js';

interface WholeOptions extends StartRequestOptions {
  qmp: string;
  vmTo: string;
  timeout?: string;
  json?: boolean;
}

/** The disk's side over the source server's control socket; `start` sends `startRequest` (migrate-request.ts). */
function storageOf(image: string, startRequest: MigrateStartRequest): StorageSide {
  const ask = async (req: object, what: string): Promise<MigrateStatus> => {
    const r = await controlRequest<MigrateStatus>(image, req, what);
    if (r === null) throw new KscError('KSC_E_NOT_FOUND', `no kscinc serve holds ${image} (no control socket at ${controlPath(image)}): migrate runs inside the server`);
    return r;
  };
  return {
    start: () => ask(startRequest, 'the migration started'),
    status: () => ask({ op: 'migrate-status' }, "the migration's status answered"),
    complete: () => ask({ op: 'migrate-complete' }, "the migration's complete answered"),
    cancel: () => ask({ op: 'migrate-cancel' }, "the migration's cancel answered"),
  };
}

async function whole(image: string, o: WholeOptions): Promise<void> {
  // Checked here, not as commander's required options, so that a bare `kscinc migrate` (this is the default
  // subcommand) says what is missing first: the image.
  for (const [flag, v] of [
    ['--to', o.to],
    ['--qmp', o.qmp],
    ['--vm-to', o.vmTo],
  ] as const) {
    if (!v) throw new KscError('KSC_E_INVALID', `kscinc migrate ${image}: ${flag} is required (or use kscinc migrate start|status|complete|cancel for the disk alone)`);
  }
  const timeoutS = o.timeout !== undefined ? Number(o.timeout) : 600;
  if (!Number.isFinite(timeoutS) || timeoutS <= 0) throw new KscError('KSC_E_INVALID', `--timeout must be a positive number of seconds, not ${o.timeout}`);
  if (!/^(tcp|unix|exec|rdma|fd):/.test(o.vmTo)) throw new KscError('KSC_E_INVALID', `--vm-to ${o.vmTo}: expected a QEMU migration URI such as tcp:HOST:PORT`);
  const startRequest = await migrateStartRequest(o); // TLS files checked, a repository's key opened: before QEMU is touched
  const qmp = await Qmp.connect(o.qmp, 1000);
  const abort = new AbortController();
  const onSignal = (): void => abort.abort();
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  try {
    const r = await migrateVm(storageOf(image, startRequest), new QmpVmMigration(qmp), {
      vmTo: o.vmTo,
      timeoutMs: timeoutS * 1000,
      signal: abort.signal,
      log: o.json ? undefined : logSink().line, // a stalled reader must not lengthen the switch-over
    });
    if (o.json) printJson(r);
    else {
      println(`moved:       ${image} to ${o.to}, VM to ${o.vmTo}`);
      println(`disk:        ${r.storage.bytesSent} bytes sent, ${r.storage.rounds} round(s), switch-over pause ${r.storage.pauseMs} ms`);
      println(`VM:          QEMU downtime ${r.vm.downtimeMs ?? '?'} ms (the disk's switch-over inside it took ${r.storagePauseMs} ms), total ${r.totalMs} ms`);
    }
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    qmp.close();
  }
}

/** Registers `whole` as the default subcommand of `migrate`, so `kscinc migrate IMAGE --to … --qmp …` works. */
export function registerMigrateVm(m: Command): void {
  const whole_ = m.command('whole', { isDefault: true });
  addStartRequestOptions(whole_)
    .description("move the VM and its disk: QEMU's RAM migration (via QMP) and the disk's, switched over together at QEMU's pre-switchover pause")
    .argument('<image>', 'the VM disk a running `kscinc serve` holds')
    .option('--to <uri>', "the disk's destination: nbd://HOST:PORT/EXPORT (a `kscinc serve --incoming`)")
    .option('--qmp <socket>', "the source QEMU's QMP unix socket")
    .option('--vm-to <uri>', 'where the destination QEMU waits with -incoming, e.g. tcp:HOST:PORT')
    .option('--timeout <seconds>', 'give up (cancelling both) when the disk has not converged or QEMU not reached its switch-over after this long (default 600)')
    .option('--json', 'print JSON')
    .action(whole);
}
