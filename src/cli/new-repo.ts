/**
 * How the CLI creates repositories (formats/repository.md §13.0): encrypted unless --no-encrypt, the new
 * key protected by the password of KSCINC_PASSWORD_FILE / KSCINC_PASSWORD_COMMAND, typed twice on a
 * terminal, and/or a new --key-file (repo init). Without any of them: one error naming them, nothing created.
 */
import { initPassword, passwordFrom } from '../crypto/password.js';
import { openStore } from '../objstore/open.js';
import { CONFIG_KEY } from '../repo/constants.js';
import { noPasswordError } from '../repo/encryption-choice.js';
import { storeForBackup } from '../repo/open-at.js';
import { withOpenRepo } from '../repo/open-close.js';
import { Repository, type EncryptChoice } from '../repo/repository.js';
import { KscError } from '../errors.js';

export interface EncryptFlags {
  /** --encrypt (true), --no-encrypt (false), neither (undefined: encrypted). */
  encrypt?: boolean;
  keyFile?: string;
  kdfN?: number;
}

/**
 * The encryption of a repository the command may create: false with --no-encrypt, else decided when it is
 * created (a password asked then, only then). `prompt`: whether a terminal may be asked (not the scheduler).
 */
export function encryptChoice(o: EncryptFlags, prompt = true): EncryptChoice {
  if (o.encrypt === false) {
    if (o.keyFile || o.kdfN) throw new KscError('KSC_E_INVALID', '--key-file and --kdf-n make an encrypted repository: they do not go with --no-encrypt');
    return false;
  }
  return async () => {
    const password = prompt ? await initPassword(!!o.keyFile) : passwordFrom(process.env, 'KSCINC_PASSWORD_FILE', 'KSCINC_PASSWORD_COMMAND');
    if (!password && !o.keyFile) throw noPasswordError();
    return { password, keyFile: o.keyFile, scrypt: o.kdfN ? { N: o.kdfN, r: 8, p: 1 } : undefined };
  };
}

/**
 * Before a backup is sent to a running server: creates the repository at `location` when it does not exist
 * yet, here in the client, so that its key is the client's (its password, its terminal) and --no-encrypt
 * holds; the server then gets the key over the control socket like any other (control-key.ts).
 */
export async function createForServer(location: string, encrypt: EncryptChoice, chunkSize?: number): Promise<void> {
  let exists = false;
  try {
    const store = await openStore(location);
    try {
      exists = (await store.stat(CONFIG_KEY)) !== null;
    } finally {
      await store.close();
    }
  } catch {
    // no folder or bucket yet (or unreachable: storeForBackup says so)
  }
  if (exists) return;
  const s = await storeForBackup(location, encrypt);
  await withOpenRepo(
    s.store,
    (st) => Repository.openOrInit(st, { encrypt: s.encrypt, chunkSize }),
    async () => undefined,
  );
}
