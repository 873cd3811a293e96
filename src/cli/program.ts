/**
 * The `kscinc` CLI. Thin: each command parses its options, calls the library, renders text or --json and
 * picks an exit code. Errors print as one line on stderr (a stack trace only with --debug).
 */
import { rmSync, statSync } from 'node:fs';
import { Command, CommanderError, InvalidArgumentError, Option, type Argument } from 'commander';
import { isKscError } from '../errors.js';
import { nativeOps } from '../io/native.js';
import { creatingNow, pendingFiles, publishingAs } from '../io/pending.js';
import { errorCode, errorLine } from './errors.js';
import { EXIT, exitHelp } from './exit.js';
import { setProgressEnabled } from './progress.js';

type Register = (program: Command) => void;

/** A command group: its module, the top-level commands it registers and how a run of them ends. */
interface CommandGroup {
  commands: string[];
  /**
   * The commands of `commands` that end with their action: the action awaits all its work (the image closed,
   * the repository's lock released, the summary written), so the process exits once it has returned (and
   * stdout and stderr have drained, src/cli/main.ts) instead of tearing down Node's environment handle by
   * handle first (≈ 5–11 ms of a small incremental's wall, bench/README.md session 19). Only commands known to
   * leave nothing running: others (serve, a server's control) end when their handles close.
   */
  endsWithAction?: string[];
  /**
   * The group's commands handle SIGINT and SIGTERM themselves (a server drains, the daemon runs its shutdown
   * jobs): run() then installs no handler of its own (the one that removes files a killed command was making).
   */
  ownsSignals?: true;
  load: () => Promise<Register>;
}

/**
 * The command groups, each a module of its own, and the top-level commands each registers. A run loads only
 * the group of the command it names (module loading is a large share of a short command's time); help, a
 * version query or an unknown command load them all. test/cli/groups.test.ts keeps this table true.
 */
export const COMMAND_GROUPS: Record<string, CommandGroup> = {
  image: { commands: ['create', 'info', 'map', 'check', 'convert', 'snapshot', 'commit', 'rebase'], load: async () => (await import('./image-commands.js')).registerImageCommands },
  bitmap: { commands: ['bitmap'], load: async () => (await import('./bitmap-commands.js')).registerBitmapCommands },
  io: { commands: ['write', 'read'], load: async () => (await import('./io-commands.js')).registerIoCommands },
  serve: { commands: ['serve', 'status', 'upgrade'], ownsSignals: true, load: async () => (await import('./serve-commands.js')).registerServeCommands },
  migrate: { commands: ['migrate'], load: async () => (await import('./migrate-commands.js')).registerMigrateCommands },
  replicate: { commands: ['replicate'], load: async () => (await import('./replicate-commands.js')).registerReplicateCommands },
  backup: {
    commands: ['backup', 'restore', 'pull', 'backups', 'verify', 'prune', 'repo'],
    endsWithAction: ['backup'],
    load: async () => (await import('./backup-commands.js')).registerBackupCommands,
  },
  key: { commands: ['key'], load: async () => (await import('./key-commands.js')).registerKeyCommands },
  schedule: { commands: ['schedule'], ownsSignals: true, load: async () => (await import('./schedule-commands.js')).registerScheduleCommands },
  completion: { commands: ['completion'], load: async () => (await import('./completion.js')).registerCompletionCommand },
};

/** The group whose command `argv` runs (its first operand), or null when every group is needed. */
export function groupFor(argv: string[]): string | null {
  const first = argv.slice(2).find((a) => !a.startsWith('-'));
  if (first === undefined) return null;
  for (const [name, g] of Object.entries(COMMAND_GROUPS)) if (g.commands.includes(first)) return name;
  return null;
}

/**
 * True when the command `argv` runs ends with its action (its group's `endsWithAction`): not for help
 * (`--help`, `-h`), which only prints.
 */
export function endsWithItsAction(argv: string[]): boolean {
  const first = argv.slice(2).find((a) => !a.startsWith('-'));
  const group = groupFor(argv);
  if (first === undefined || group === null || argv.includes('--help') || argv.includes('-h')) return false;
  return COMMAND_GROUPS[group]!.endsWithAction?.includes(first) ?? false;
}

/**
 * True when `argv` only asks for the version (`--version` or `-V`, no command, no help): then no command
 * group is loaded, since commander answers before it would look at one.
 */
export function versionOnly(argv: string[]): boolean {
  const args = argv.slice(2);
  return args.some((a) => a === '--version' || a === '-V') && args.every((a) => a.startsWith('-') && a !== '--help' && a !== '-h');
}

/** Commander's error lines ("error: …", "(Did you mean …?)") as one line with the one prefix. */
function oneLine(text: string): string {
  return `kscinc: ${text
    .replace(/^error: /, '')
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l !== '')
    .join(' ')}\n`;
}

/** A parser's KscError (bad size, bad number) becomes commander's: reported as a usage error, one line. */
function asUsageParser<T extends { parseArg?: (value: string, previous: never) => unknown }>(target: T): void {
  const parse = target.parseArg;
  if (!parse) return;
  target.parseArg = ((value: string, previous: never) => {
    try {
      return parse(value, previous);
    } catch (e) {
      if (isKscError(e) || (e instanceof Error && !(e instanceof CommanderError))) throw new InvalidArgumentError(errorLine(e));
      throw e;
    }
  }) as T['parseArg'];
}

/** Every command below `cmd`, with its full name ("schedule status"). */
export function walkCommands(cmd: Command, prefix = ''): { name: string; cmd: Command }[] {
  const out: { name: string; cmd: Command }[] = [];
  for (const c of cmd.commands) {
    const name = prefix ? `${prefix} ${c.name()}` : c.name();
    out.push({ name, cmd: c }, ...walkCommands(c, name));
  }
  return out;
}

/** The program with every command group, or only `group`'s, or none (`commands: false`). */
export async function buildProgram(group: string | null = null, opts: { commands?: boolean } = {}): Promise<Command> {
  const program = new Command();
  program
    .name('kscinc')
    .description('ksc_inc images: block overlays with crash-safe persistent dirty bitmaps')
    .version('0.1.0')
    .addOption(new Option('--debug', 'print stack traces on errors'))
    .addOption(new Option('-q, --quiet', 'draw no progress bars'))
    .configureOutput({ outputError: (text, write) => write(oneLine(text)) })
    .exitOverride();
  program.addHelpText('after', exitHelp(null));
  const groups = opts.commands === false ? [] : group ? [COMMAND_GROUPS[group]!] : Object.values(COMMAND_GROUPS);
  for (const register of await Promise.all(groups.map((g) => g.load()))) register(program);
  for (const { name, cmd } of walkCommands(program)) {
    for (const o of cmd.options) asUsageParser(o as Option & { parseArg?: (value: string, previous: never) => unknown });
    for (const a of cmd.registeredArguments) asUsageParser(a as Argument & { parseArg?: (value: string, previous: never) => unknown });
    if (cmd.commands.length === 0) cmd.addHelpText('after', exitHelp(name));
  }
  return program;
}

/**
 * How long a signal's handler waits, the command's loop still running, for opens that may create a file
 * before it exits anyway.
 */
const SETTLE_WAIT_MS = 2000;
/** How long the exit may go without any I/O before the watchdog ends the process (native/kscinc_exit.c). */
const EXIT_QUIET_MS = 2000;

/** Whether an fs request of this thread is running on libuv's threads (process.exit would wait for it). */
function fsInFlight(): boolean {
  return process.getActiveResourcesInfo().some((r) => r.startsWith('FSReq'));
}

/**
 * Until the command ends, Ctrl-C or SIGTERM removes the files being made and exits (130 / 143). An open that
 * creates one may be running on a libuv thread right then: the file would appear after the removal, so the
 * handler waits for such opens (at most SETTLE_WAIT_MS) and removes again before it exits. A second signal
 * meanwhile exits at once.
 *
 * process.exit waits for libuv's threads: an fs request that never returns (a hard NFS mount hung in read or
 * fsync, the open of a fifo nobody opens from the other side) would keep the process alive for ever. With the
 * addon the handler arms a watchdog first, which ends the process with the same status once the exit has gone
 * EXIT_QUIET_MS without a read or write call (an fsync, open or rename in flight then may be cut: the kernel
 * finishes or abandons it, as with SIGKILL). Without it (KSCINC_NO_NATIVE=1), when any fs request is in
 * flight at the exit, the signal is raised again with its default action at once: the process ends by the
 * signal itself (the shell's 128 + n; a parent sees the signal, not an exit code), never waiting on a request
 * that may never return, and the command's loop runs no further.
 */
export function removeUnfinishedOnSignal(): () => void {
  const removed: string[] = [];
  const inode = (p: string): string | null => {
    try {
      const st = statSync(p);
      return `${st.dev}:${st.ino}`;
    } catch {
      return null;
    }
  };
  const removePending = (): void => {
    for (const temp of pendingFiles) {
      const target = publishingAs.get(temp);
      const was = target === undefined ? null : inode(temp);
      for (const f of [temp, `${temp}.lock`]) {
        try {
          rmSync(f);
          // Looked at after the removal: a link not made by now fails (its source name is gone), so a target
          // with the temporary's inode was published whole and only its second name went.
          const published = was !== null && inode(target!) === was;
          if (f === temp && !published && !removed.includes(temp)) removed.push(temp);
        } catch {
          // already gone (a restore's temporary once published under the target's name), or nothing more can be done on the way out
        }
      }
    }
  };
  let exiting = false;
  const exit = (sig: NodeJS.Signals, code: number): never => {
    const watchdog = nativeOps()?.armExitWatchdog;
    if (watchdog) watchdog(code, EXIT_QUIET_MS);
    else if (creatingNow() > 0 || fsInFlight()) {
      process.off('SIGINT', handler);
      process.off('SIGTERM', handler);
      process.kill(process.pid, sig);
    }
    process.exit(code);
  };
  const handler = (sig: NodeJS.Signals): void => {
    const code = sig === 'SIGINT' ? EXIT.INTERRUPTED : EXIT.TERMINATED;
    if (exiting) exit(sig, code);
    exiting = true;
    // Only creates are waited for (the command's loop runs on meanwhile): anything else in flight is the
    // exit's to finish, or the watchdog's / the re-raised signal's to cut.
    const settled = (): boolean => creatingNow() === 0;
    const finish = (): never => {
      removePending();
      process.stderr.write(`kscinc: interrupted by ${sig}${removed.length ? `; removed the unfinished ${removed.join(', ')}` : ''}\n`);
      return exit(sig, code);
    };
    removePending();
    if (settled()) finish();
    const since = performance.now();
    const poll = setInterval(() => {
      if (!settled() && performance.now() - since < SETTLE_WAIT_MS) return;
      clearInterval(poll);
      finish();
    }, 20);
  };
  process.on('SIGINT', handler);
  process.on('SIGTERM', handler);
  return () => {
    process.off('SIGINT', handler);
    process.off('SIGTERM', handler);
  };
}

export async function run(argv: string[]): Promise<number> {
  const group = groupFor(argv);
  const json = argv.includes('--json');
  if (argv.includes('--quiet') || argv.includes('-q')) setProgressEnabled(false);
  const release = group !== null && COMMAND_GROUPS[group]!.ownsSignals !== true ? removeUnfinishedOnSignal() : () => undefined;
  try {
    const program = await buildProgram(group, { commands: !versionOnly(argv) });
    await program.parseAsync(argv);
    return typeof process.exitCode === 'number' ? process.exitCode : 0;
  } catch (e) {
    if (e instanceof CommanderError) {
      if (e.exitCode === 0) return 0;
      if (json) process.stdout.write(`${JSON.stringify({ error: { code: 'KSC_E_USAGE', message: oneLine(e.message).slice(8).trim(), exitCode: EXIT.USAGE } })}\n`);
      return EXIT.USAGE;
    }
    const debug = argv.includes('--debug');
    if (debug && e instanceof Error) process.stderr.write(`${e.stack}\n`);
    const line = errorLine(e);
    const code = typeof (e as { exitCode?: unknown }).exitCode === 'number' ? (e as { exitCode: number }).exitCode : EXIT.ERROR;
    if (json) process.stdout.write(`${JSON.stringify({ error: { code: errorCode(e), message: line, exitCode: code } })}\n`);
    process.stderr.write(`kscinc: ${line}\n`);
    return code;
  } finally {
    release();
  }
}
