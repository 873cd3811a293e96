/**
 * Whether a new repository is encrypted, and how its master key is protected (formats/repository.md §13.0):
 * encrypted is the default. `encrypt: false` opts out; undefined takes the password of the environment
 * (KSCINC_PASSWORD_FILE or KSCINC_PASSWORD_COMMAND; the library never prompts — the CLI adds a prompt on a
 * terminal by passing a function); with none, KSC_E_INVALID before anything is created.
 */
import { KscError } from '../errors.js';
import { passwordFrom } from '../crypto/password.js';
import { type ScryptParams, defaultScrypt } from '../crypto/keys.js';

/** How `repo init --encrypt` protects the new master key (§13.3): a password, a key file, or both. */
export interface EncryptOptions {
  password?: Buffer | null;
  /** A new file to write the master key into (kdf "none"; mode 0600; never overwritten). */
  keyFile?: string | null;
  /** The new key object's scrypt cost (default: KSCINC_KDF_N, else N = 32768, r = 8, p = 1). */
  scrypt?: ScryptParams;
}

/**
 * A new repository's encryption: EncryptOptions, false (not encrypted), a function that decides when the
 * repository is really created (a prompt), or undefined: the default (encrypted, password from the
 * environment).
 */
export type EncryptChoice = EncryptOptions | false | (() => Promise<EncryptOptions | false>);

/** The error of a new repository that would be encrypted (the default) with no password to protect its key. */
export function noPasswordError(optOut = 'option noEncrypt'): KscError {
  return new KscError(
    'KSC_E_INVALID',
    `new repositories are encrypted, and no password was given to protect the key: set KSCINC_PASSWORD_FILE (a file holding the password) or KSCINC_PASSWORD_COMMAND (a command printing it), or run on a terminal to type it; or create an unencrypted repository with ${optOut}. Nothing was created`,
  );
}

/** Resolves `choice` (see EncryptChoice): false, or options holding a password or a key file. */
export async function resolveEncryption(choice: EncryptChoice | undefined, env: NodeJS.ProcessEnv = process.env): Promise<EncryptOptions | false> {
  const c = typeof choice === 'function' ? await choice() : choice;
  if (c === false) return false;
  if (c === undefined) {
    const password = passwordFrom(env, 'KSCINC_PASSWORD_FILE', 'KSCINC_PASSWORD_COMMAND');
    if (!password) throw noPasswordError('option noEncrypt (library: encrypt: false)');
    return checked({ password });
  }
  if (!c.password && !c.keyFile) throw noPasswordError();
  return checked(c);
}

/** Checks `c` whole before anything is created (an empty password, a bad KSCINC_KDF_N). */
function checked(c: EncryptOptions): EncryptOptions {
  if (c.password && c.password.length === 0) throw new KscError('KSC_E_INVALID', 'the password of the new repository is empty');
  return c.password ? { ...c, scrypt: c.scrypt ?? defaultScrypt() } : c;
}
