/**
 * The `kscinc` CLI. Thin: each command parses its options, calls the library, renders text or --json and
 * picks an exit code. Errors print as one line on stderr (a stack trace only with --debug).
 */
import { Command, CommanderError, Option } from 'commander';
import { isKscError } from '../errors.js';
import { registerImageCommands } from './image-commands.js';
import { registerBitmapCommands } from './bitmap-commands.js';
import { registerIoCommands } from './io-commands.js';
import { registerServeCommands } from './serve-commands.js';
import { registerBackupCommands } from './backup-commands.js';
import { registerScheduleCommands } from './schedule-commands.js';

export function buildProgram(): Command {
  const program = new Command();
  program
    .name('kscinc')
    .description('ksc_inc images: block overlays with crash-safe persistent dirty bitmaps')
    .version('0.1.0')
    .addOption(new Option('--debug', 'print stack traces on errors'))
    .exitOverride();
  registerImageCommands(program);
  registerBitmapCommands(program);
  registerIoCommands(program);
  registerServeCommands(program);
  registerBackupCommands(program);
  registerScheduleCommands(program);
  return program;
}

export async function run(argv: string[]): Promise<number> {
  const program = buildProgram();
  try {
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
