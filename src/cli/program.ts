/**
 * The `kscinc` CLI. Thin: each command parses its options, calls the library, renders text or --json and
 * picks an exit code. Errors print as one line on stderr (a stack trace only with --debug).
 */
import { Command, CommanderError, Option } from 'commander';
import { isKscError } from '../errors.js';

type Register = (program: Command) => void;

/**
 * The command groups, each a module of its own, and the top-level commands each registers. A run loads only
 * the group of the command it names (module loading is a large share of a short command's time); help, a
 * version query or an unknown command load them all. test/cli-groups.test.ts keeps this table true.
 */
export const COMMAND_GROUPS: Record<string, { commands: string[]; load: () => Promise<Register> }> = {
  image: { commands: ['create', 'info', 'map', 'check', 'convert', 'snapshot', 'commit', 'rebase'], load: async () => (await import('./image-commands.js')).registerImageCommands },
  bitmap: { commands: ['bitmap'], load: async () => (await import('./bitmap-commands.js')).registerBitmapCommands },
  io: { commands: ['write', 'read'], load: async () => (await import('./io-commands.js')).registerIoCommands },
  serve: { commands: ['serve'], load: async () => (await import('./serve-commands.js')).registerServeCommands },
  backup: { commands: ['backup', 'restore', 'backups', 'verify', 'prune', 'repo'], load: async () => (await import('./backup-commands.js')).registerBackupCommands },
  schedule: { commands: ['schedule'], load: async () => (await import('./schedule-commands.js')).registerScheduleCommands },
};

/** The group whose command `argv` runs (its first operand), or null when every group is needed. */
export function groupFor(argv: string[]): string | null {
  const first = argv.slice(2).find((a) => !a.startsWith('-'));
  if (first === undefined) return null;
  for (const [name, g] of Object.entries(COMMAND_GROUPS)) if (g.commands.includes(first)) return name;
  return null;
}

/** The program with every command group, or only `group`'s. */
export async function buildProgram(group: string | null = null): Promise<Command> {
  const program = new Command();
  program
    .name('kscinc')
    .description('ksc_inc images: block overlays with crash-safe persistent dirty bitmaps')
    .version('0.1.0')
    .addOption(new Option('--debug', 'print stack traces on errors'))
    .exitOverride();
  const groups = group ? [COMMAND_GROUPS[group]!] : Object.values(COMMAND_GROUPS);
  for (const register of await Promise.all(groups.map((g) => g.load()))) register(program);
  return program;
}

export async function run(argv: string[]): Promise<number> {
  try {
    const program = await buildProgram(groupFor(argv));
    await program.parseAsync(argv);
    return typeof process.exitCode === 'number' ? process.exitCode : 0;
  } catch (e) {
    if (e instanceof CommanderError) return e.exitCode === 0 ? 0 : 2;
    const debug = argv.includes('--debug');
    if (debug && e instanceof Error) process.stderr.write(`${e.stack}\n`);
    const msg = isKscError(e) ? e.message : e instanceof Error ? e.message : String(e);
    process.stderr.write(`kscinc: ${msg.split('\n')[0]}\n`);
    return 1;
  }
}
