/** kscinc key list | add | remove | passwd (formats/repository.md §13.3): the key objects of an encrypted repository. */
import type { Command } from 'commander';
import { KscError } from '../errors.js';
import { openStore } from '../objstore/open.js';
import { Repository } from '../repo/repository.js';
import { withOpenRepo } from '../repo/open-close.js';
import { addKey, keyObjectKey, listKeyIds, readKeyObject, removeKey, unlock } from '../crypto/keyring.js';
import { DEFAULT_SCRYPT, type ScryptParams, defaultScrypt, parseKdfN } from '../crypto/keys.js';
import { newPassword, unlockFromEnv } from '../crypto/password.js';
import { println, printJson } from './output.js';
import type { ObjectStore } from '../objstore/types.js';

interface KeyOpts {
  repo: string;
  keyFile?: string;
  kdfN?: number;
  json?: boolean;
}

/** Opens the repository and its master key with the password (or key file) the environment gives. */
async function withKeys<T>(o: KeyOpts, fn: (store: ObjectStore, repo: Repository, master: Buffer, keyId: string | null) => Promise<T>): Promise<T> {
  const store = await openStore(o.repo);
  const u = { ...unlockFromEnv(), ...(o.keyFile ? { keyFile: o.keyFile, requireEncrypted: true } : {}) };
  return withOpenRepo(
    store,
    (st) => Repository.open(st, u),
    async (repo) => {
      if (!repo.encrypted) throw new KscError('KSC_E_INVALID', `${store.name} is not encrypted: it has no keys`);
      const k = await unlock(store, repo.config.id, repo.config.encryption!.keyCheck, u);
      return fn(store, repo, k.master, k.keyId);
    },
  );
}

function scryptOf(o: KeyOpts): ScryptParams {
  return o.kdfN ? { ...DEFAULT_SCRYPT, N: o.kdfN } : defaultScrypt();
}

/** A new key object wrapping `master` under the new password from the environment; returns its id. */
async function addKeyFromEnv(store: ObjectStore, repo: Repository, master: Buffer, o: KeyOpts): Promise<string> {
  return addKey(store, repo.config.id, master, await newPassword(), scryptOf(o));
}

export function kdfN(v: string): number {
  return parseKdfN(v);
}

export function registerKeyCommands(program: Command): void {
  const key = program
    .command('key')
    .description(
      'manage the keys (passwords) of an encrypted repository; passwords come from KSCINC_PASSWORD_FILE / KSCINC_PASSWORD_COMMAND, new ones from KSCINC_NEW_PASSWORD_FILE / KSCINC_NEW_PASSWORD_COMMAND',
    );
  const common = (c: Command): Command =>
    c
      .requiredOption('--repo <repo>', 'repository: a folder, or s3://BUCKET/PREFIX', process.env.KSCINC_REPO)
      .option('--key-file <file>', 'open with this key file instead of a password (default: KSCINC_KEY_FILE)');
  common(key.command('list').description('list the key objects').option('--json', 'print JSON')).action(async (o: KeyOpts) =>
    withKeys(o, async (store, repo, _m, current) => {
      const rows = [];
      for (const id of await listKeyIds(store)) {
        try {
          const k = await readKeyObject(store, id);
          if (k.repository !== repo.config.id) rows.push({ id, current: false, damaged: `a key of another repository (${k.repository}): left by an interrupted init, or planted` });
          else rows.push({ id, current: id === current, created: k.created, host: k.host ?? '', user: k.user ?? '', kdf: k.kdf, scrypt: k.scrypt });
        } catch (e) {
          rows.push({ id, current: false, damaged: (e as Error).message });
        }
      }
      if (o.json) return printJson(rows);
      for (const r of rows)
        println(`${r.current ? '*' : ' '} ${r.id}  ${'damaged' in r ? `DAMAGED: ${r.damaged}` : `${r.created}  ${r.user}@${r.host}  scrypt N=${r.scrypt?.N} r=${r.scrypt?.r} p=${r.scrypt?.p}`}`);
    }),
  );
  /** A subcommand that makes a key object under a new password: its scrypt cost and JSON options. */
  const makesKey = (name: string, description: string): Command =>
    common(key.command(name).description(description).option('--kdf-n <n>', 'scrypt cost N (power of two; default 32768)', kdfN).option('--json', 'print JSON'));
  makesKey('add', 'add a key object wrapping the master key under a new password').action(async (o: KeyOpts) =>
    withKeys(o, async (store, repo, master) => {
      const id = await addKeyFromEnv(store, repo, master, o);
      if (o.json) return printJson({ added: id });
      println(`added key ${id} (${store.name}/${keyObjectKey(id)})`);
    }),
  );
  common(
    key
      .command('remove')
      .argument('<id>', 'the key to remove (kscinc key list)')
      .description('remove a key object (never the last one, nor the one opening the repository now)')
      .option('--json', 'print JSON'),
  ).action(async (id: string, o: KeyOpts) =>
    withKeys(o, async (store, _repo, _m, current) => {
      if (id === current) throw new KscError('KSC_E_INVALID', `key ${id} is the one your password opens: remove it with another key's password, or change it with "kscinc key passwd"`);
      await removeKey(store, id);
      if (o.json) return printJson({ removed: id });
      println(`removed key ${id}`);
    }),
  );
  makesKey('passwd', 'change the password of the key your password opens (a new key object replaces it)').action(async (o: KeyOpts) =>
    withKeys(o, async (store, repo, master, current) => {
      if (!current) throw new KscError('KSC_E_INVALID', 'a key file has no password to change; use "kscinc key add" to add a password');
      const id = await addKeyFromEnv(store, repo, master, o); // the new key lands first
      await store.delete(keyObjectKey(current));
      if (o.json) return printJson({ added: id, removed: current });
      println(`changed the password: key ${current} replaced by ${id}`);
    }),
  );
}
