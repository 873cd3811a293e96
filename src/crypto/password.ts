/**
 * Where a password comes from (formats/repository.md §13.3): KSCINC_PASSWORD_FILE, KSCINC_PASSWORD_COMMAND
 * (run by /bin/sh, its standard output), or a key file (KSCINC_KEY_FILE or --key-file) — never the command
 * line; without them, on a terminal, from a prompt (tty.ts). A new password (key add, passwd) comes from
 * KSCINC_NEW_PASSWORD_FILE / KSCINC_NEW_PASSWORD_COMMAND, or is typed twice on a terminal.
 */
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { KscError } from '../errors.js';
import { canPrompt, readHidden, readNewPassword } from './tty.js';

/** How to unlock an encrypted repository. */
export interface Unlock {
  password?: Buffer | null;
  keyFile?: string | null;
  /** Refuse an unencrypted repository (§13.1 rule 2: the CLI sets it when the user gave a key file with --key-file). */
  requireEncrypted?: boolean;
  /** The master key itself (§13.3 rule 5: sent by a client over the control socket); checked against keyCheck. */
  master?: Buffer | null;
  /** Asks for the password when one is needed and none was given (a terminal, tty.ts); its answer is kept in `password`. */
  prompt?: () => Promise<Buffer>;
  /**
   * Called once when a key derivation (scrypt, ~0.1-0.2 s of a core, on libuv's thread pool) is about to
   * start: the caller may start what does not need the key meanwhile (a backup starts its worker pool).
   */
  deriving?: () => void;
}

function trimNewline(b: Buffer): Buffer {
  let n = b.length;
  if (n > 0 && b[n - 1] === 0x0a) n--;
  if (n > 0 && b[n - 1] === 0x0d) n--;
  return b.subarray(0, n);
}

/** A password from `fileVar` or `commandVar` in `env`, or null when neither is set. */
export function passwordFrom(env: NodeJS.ProcessEnv, fileVar: string, commandVar: string): Buffer | null {
  const file = env[fileVar];
  const command = env[commandVar];
  if (file && command) throw new KscError('KSC_E_INVALID', `${fileVar} and ${commandVar} are both set: set one`);
  if (file) {
    try {
      return trimNewline(readFileSync(file));
    } catch (e) {
      throw new KscError('KSC_E_INVALID', `${fileVar} ${file} cannot be read: ${(e as Error).message}`, { cause: e });
    }
  }
  if (command) {
    try {
      // Loaded here, not at the top: node:child_process brings net, dgram and more with it, and every backup and
      // restore loads this file (test/cli/builtins.test.ts; bench/README.md, session 20).
      const { execFileSync } = createRequire(import.meta.url)('node:child_process') as typeof import('node:child_process');
      return trimNewline(execFileSync('/bin/sh', ['-c', command], { stdio: ['ignore', 'pipe', 'inherit'], timeout: 60_000, maxBuffer: 64 * 1024 }));
    } catch (e) {
      throw new KscError('KSC_E_INVALID', `${commandVar} failed: ${(e as Error).message}`, { cause: e });
    }
  }
  return null;
}

/**
 * KSCINC_REQUIRE_ENCRYPTION=1: refuse every repository without encryption (§13.1 rule 2), the opt-in of a
 * client that keeps its password in the environment for every repository. Other values than 0/1/empty are
 * an error, not a silent no.
 */
export function requireEncryptionFromEnv(env: NodeJS.ProcessEnv = process.env): boolean {
  const v = env.KSCINC_REQUIRE_ENCRYPTION;
  if (v === undefined || v === '' || v === '0') return false;
  if (v === '1') return true;
  throw new KscError('KSC_E_INVALID', `KSCINC_REQUIRE_ENCRYPTION is ${JSON.stringify(v)}: set it to 1 (refuse a repository without encryption) or 0`);
}

/** The unlock material of the environment only, never a prompt (a server, the scheduler). */
export function unlockFromEnvOnly(env: NodeJS.ProcessEnv = process.env): Unlock {
  return { password: passwordFrom(env, 'KSCINC_PASSWORD_FILE', 'KSCINC_PASSWORD_COMMAND'), keyFile: env.KSCINC_KEY_FILE || null };
}

/**
 * The unlock material the environment gives (KSCINC_PASSWORD_FILE/COMMAND, KSCINC_KEY_FILE), and, when it
 * gives neither a password nor a key file and standard input is a terminal, a prompt (asked only if the
 * repository turns out to be encrypted).
 */
export function unlockFromEnv(env: NodeJS.ProcessEnv = process.env): Unlock {
  const u = unlockFromEnvOnly(env);
  if (!u.password && !u.keyFile && canPrompt()) u.prompt = () => readHidden('Repository password: ');
  return u;
}

/**
 * The password of a new repository (init --encrypt): the environment's, else — unless a key file is made
 * instead (`withKeyFile`) — typed twice on a terminal, else null.
 */
export async function initPassword(withKeyFile: boolean, env: NodeJS.ProcessEnv = process.env): Promise<Buffer | null> {
  const p = passwordFrom(env, 'KSCINC_PASSWORD_FILE', 'KSCINC_PASSWORD_COMMAND');
  if (p || withKeyFile || !canPrompt()) return p;
  return readNewPassword('New repository password');
}

/** The new password of `key add` / `key passwd`, required: from the environment, else typed twice on a terminal. */
export async function newPassword(env: NodeJS.ProcessEnv = process.env): Promise<Buffer> {
  const p = passwordFrom(env, 'KSCINC_NEW_PASSWORD_FILE', 'KSCINC_NEW_PASSWORD_COMMAND') ?? (canPrompt() ? await readNewPassword('New password') : null);
  if (!p)
    throw new KscError(
      'KSC_E_INVALID',
      'the new password is read from KSCINC_NEW_PASSWORD_FILE or KSCINC_NEW_PASSWORD_COMMAND, or typed on a terminal (never from the command line): set one, or run on a terminal',
    );
  if (p.length === 0) throw new KscError('KSC_E_INVALID', 'the new password is empty');
  return p;
}
