/**
 * The key of an encrypted repository for a backup that runs inside `kscinc serve` (formats/control.md §4,
 * formats/repository.md §13.3 rule 5). The client — `kscinc backup IMAGE`, or the scheduler — opens the
 * repository's master key itself (its password from its environment or its terminal, or its key file) and
 * sends the master key in the request's `key` member over the control socket, which only a process of the
 * server's own uid can reach (§1.1: private folder, peer credentials checked both ways). The password and
 * the key never appear on a command line, in a file, or in the server's log; the server keeps the key only
 * for that backup. A request without `key` is opened with the server's own environment
 * (KSCINC_PASSWORD_FILE/COMMAND, KSCINC_KEY_FILE) and never prompts.
 */
import { KscError } from '../errors.js';
import { openStore } from '../objstore/open.js';
import { readSmall } from '../objstore/small-object.js';
import { CONFIG_KEY } from '../repo/constants.js';
import { decodeConfig, isEncrypted } from '../repo/config.js';
import { unlock } from '../crypto/keyring.js';
import { type Unlock, unlockFromEnv, unlockFromEnvOnly } from '../crypto/password.js';

/**
 * The `key` member for a backup of `repo` sent to a server: the master key (base64) when the repository
 * exists and is encrypted, opened here (KSC_E_AUTH on a wrong password, before the server is asked);
 * undefined when it is not encrypted or does not exist yet. `prompt`: whether a terminal may be asked.
 */
export async function clientKey(repo: string, prompt = true): Promise<string | undefined> {
  let store;
  let raw: Buffer;
  try {
    store = await openStore(repo);
    // Bounded, as every open reads it (repo/location.ts): a planted fifo, link or huge object is not read whole.
    raw = await readSmall(store, CONFIG_KEY, 'config');
  } catch {
    // No folder, bucket or config yet, unreachable, or a config no config ever is: the server's own open says what is wrong.
    await store?.close();
    return undefined;
  }
  try {
    const config = decodeConfig(raw, `${store.name}/config`);
    if (!isEncrypted(config)) return undefined;
    const k = await unlock(store, config.id, config.encryption!.keyCheck, prompt ? unlockFromEnv() : unlockFromEnvOnly());
    return k.master.toString('base64');
  } finally {
    await store.close();
  }
}

/** Checks a request's `key` member: base64 of 32 bytes (KSC_E_INVALID otherwise, without echoing it). */
export function checkRequestKey(key: unknown): void {
  if (key === undefined) return;
  if (typeof key !== 'string' || !/^[A-Za-z0-9+/]{43}=$/.test(key)) throw new KscError('KSC_E_INVALID', 'bad control request: member "key" must be a master key, 32 bytes in base64');
}

/** How the server opens the repository of a request: with the key it carries, else its own environment, never a prompt. */
export function serverUnlock(key: string | undefined): Unlock {
  return key ? { master: Buffer.from(key, 'base64') } : unlockFromEnvOnly();
}
