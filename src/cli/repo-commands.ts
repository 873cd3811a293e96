/**
 * kscinc repo init | repo repair | repo unlock | repo locks. Every run of the backup group loads this module,
 * so what only these commands use (repair, the live-restore references) is imported in their actions, and
 * --kdf-n is parsed here, not with key-commands.ts's kdfN (that would load the key group).
 */
import type { Command } from 'commander';
import { openStore } from '../objstore/open.js';
import { encryptChoice } from './new-repo.js';
import { parseKdfN } from '../crypto/keys.js';
import { parseSize } from '../util/size.js';
import { formatSize, printJson, println } from './output.js';
import { KscError } from '../errors.js';
import { repoOperand, withRepo } from './repo-open.js';

export function registerRepoCommands(program: Command): void {
  const repo = program.command('repo').description('manage a backup repository');
  registerRepoInit(repo);
  registerRepoRepair(repo);
  registerRepoLocks(repo);
  registerRepoUnlock(repo);
}

/** kscinc repo init. */
function registerRepoInit(repo: Command): void {
  repo
    .command('init')
    .argument('[repo]', 'a folder, or s3://BUCKET/PREFIX (default: KSCINC_REPO)')
    .option('--chunk-size <size>', 'chunk size (power of two, 64K … 4M; default 256K)', (v) => parseSize(v, '--chunk-size'))
    .option('--pack-size <size>', 'target pack size (4M … 256M; default 32M)', (v) => parseSize(v, '--pack-size'))
    .option('--encrypt', 'encrypt and authenticate everything stored (the default)')
    .option('--no-encrypt', 'create an unencrypted repository (anyone who can read the storage reads the disks)')
    .option('--key-file <file>', 'also write the master key to this new file (mode 0600; keep it outside the repository)')
    .option('--kdf-n <n>', "scrypt cost N of the password's key (power of two; default KSCINC_KDF_N, else 32768)", (v) => parseKdfN(v))
    .description(
      'create an empty repository: encrypted unless --no-encrypt, its key protected by the password of KSCINC_PASSWORD_FILE or KSCINC_PASSWORD_COMMAND (else typed twice on a terminal) and/or a new --key-file',
    )
    .action(async (location: string | undefined, o: { chunkSize?: number; packSize?: number; encrypt?: boolean; keyFile?: string; kdfN?: number }) => {
      const encrypt = encryptChoice(o);
      await withRepo(
        repoOperand(location),
        'create',
        async (r) => {
          println(
            `created ${r.encrypted ? 'encrypted' : 'unencrypted'} repository ${r.name} (chunk size ${formatSize(r.config.chunkSize)}, pack size ${formatSize(r.config.packSize)}${r.encrypted ? `; ${r.keyId ? `key ${r.keyId}` : ''}${r.keyId && o.keyFile ? ', ' : ''}${o.keyFile ? `key file ${o.keyFile}` : ''}` : ''})`,
          );
        },
        { chunkSize: o.chunkSize, packSize: o.packSize, encrypt },
      );
    });
}

/** kscinc repo repair. */
function registerRepoRepair(repo: Command): void {
  repo
    .command('repair')
    .argument('<repo>', 'a folder, or s3://BUCKET/PREFIX, whose config object was lost or damaged')
    .option('--chunk-size <size>', 'the chunk size, when the manifests do not say it or disagree', (v) => parseSize(v, '--chunk-size'))
    .option('--pack-size <size>', 'target pack size of the new config (default 32M)', (v) => parseSize(v, '--pack-size'))
    .option('--dry-run', 'only say what config would be written')
    .option('--json', 'print JSON')
    .description('rebuild a lost or damaged config object from the manifests (writes nothing else)')
    .action(async (location: string, o: { chunkSize?: number; packSize?: number; dryRun?: boolean; json?: boolean }) => {
      const store = await openStore(location);
      try {
        const { repairConfig } = await import('../repo/repair.js');
        const r = await repairConfig(store, o);
        if (o.json) return printJson(r);
        const from = {
          manifests: `from ${r.manifestsRead} manifest(s)`,
          packs: 'from the largest chunk in the packs (no readable manifest)',
          option: 'from --chunk-size',
          default: 'the default (no manifest, no readable pack)',
        }[r.chunkSizeFrom];
        println(
          `${r.dryRun ? 'would write' : 'wrote'} ${store.name}/config: chunk size ${formatSize(r.config.chunkSize)} (${from}), pack size ${formatSize(r.config.packSize)}, ${r.config.version === 2 ? 'encrypted, its repository id kept' : 'new repository id'} ${r.config.id}`,
        );
        if (r.manifestsDamaged.length) println(`warning: ${r.manifestsDamaged.length} manifest(s) could not be read: ${r.manifestsDamaged.join(', ')}`);
        if (r.manifestsOtherChunkSize.length) println(`warning: ${r.manifestsOtherChunkSize.length} manifest(s) of another chunk size stay unreadable: ${r.manifestsOtherChunkSize.join(', ')}`);
      } finally {
        await store.close();
      }
    });
}

/** kscinc repo locks. */
function registerRepoLocks(repo: Command): void {
  repo
    .command('locks')
    .argument('[repo]', 'a folder, or s3://BUCKET/PREFIX (default: KSCINC_REPO)')
    .option('--json', 'print JSON')
    .description("list the locks held on a repository (ages by the storage's clock)")
    .action(async (location: string | undefined, o: { json?: boolean }) => {
      await withRepo(repoOperand(location), 'open', async (r) => {
        const locks = await r.listLocks();
        const { listLiveRefs } = await import('../repo/liverefs.js');
        const refs = await listLiveRefs(r.store);
        // JSON: the array of locks, then one entry per live-restore reference (kind "live-restore").
        if (o.json)
          return printJson([
            ...locks,
            ...refs.map((x) => ({
              key: x.key,
              kind: 'live-restore',
              backup: x.backup,
              image: x.body?.image ?? null,
              host: x.body?.host ?? null,
              ageMs: x.ageMs,
              garbage: !x.body,
              stale: x.stale,
              reason: x.reason,
            })),
          ]);
        if (locks.length === 0) println('no locks');
        for (const l of locks) println(`${l.key}  ${l.garbage ? 'GARBAGE' : `${l.kind}  ${l.what}  host ${l.host} pid ${l.pid}`}  ${l.stale ? 'STALE' : 'live'}: ${l.reason}`);
        for (const x of refs) println(`${x.key}  ${x.body ? 'reference' : 'GARBAGE'}  ${x.stale ? 'STALE' : 'live'}: ${x.reason} (prune keeps backup ${x.backup ?? '?'})`);
      });
    });
}

/** kscinc repo unlock. */
function registerRepoUnlock(repo: Command): void {
  repo
    .command('unlock')
    .argument('[repo]', 'a folder, or s3://BUCKET/PREFIX (default: KSCINC_REPO)')
    .option('--force', 'remove every lock, live ones too (only when no kscinc process uses the repository)')
    .option('--all', 'the same as --force')
    .option('--ref <key...>', "also remove these live-restore references (refs/live/…), live ones too: their images then lose prune's protection")
    .option('--json', 'print JSON')
    .description('remove stale locks and garbage lock objects, and stale live-restore references; say why the others are kept')
    .action(async (location: string | undefined, o: { force?: boolean; all?: boolean; ref?: string[]; json?: boolean }) => {
      await withRepo(repoOperand(location), 'open', async (r) => {
        const { removed, kept } = await r.unlock(!!(o.force || o.all));
        // repository.md §8.1: stale references go; live ones (and garbage) only when named (--force does not touch them).
        const named = new Set(o.ref ?? []);
        const { listLiveRefs } = await import('../repo/liverefs.js');
        const refs = await listLiveRefs(r.store);
        for (const k of named) if (!refs.some((x) => x.key === k)) throw new KscError('KSC_E_NOT_FOUND', `--ref ${k}: no such live-restore reference in ${r.name} ("kscinc repo locks" lists them)`);
        const refsRemoved = refs.filter((x) => x.stale || named.has(x.key));
        const refsKept = refs.filter((x) => !refsRemoved.includes(x));
        for (const x of refsRemoved) await r.store.delete(x.key);
        if (o.json) return printJson({ removed, kept, refsRemoved, refsKept });
        for (const l of removed) println(`removed ${l.key}: ${l.stale ? l.reason : `live, removed by --force (${l.reason})`}`);
        for (const l of kept) println(`kept ${l.key} (${l.what || l.kind}, host ${l.host} pid ${l.pid}): ${l.reason}; "--force" removes it`);
        for (const x of refsRemoved) println(`removed ${x.key}: ${x.stale ? x.reason : `removed by --ref (${x.reason})`}`);
        for (const x of refsKept) println(`kept ${x.key}: ${x.reason}; "kscinc pull" of the image removes it, "--ref ${x.key}" too`);
        println(`${removed.length} lock(s) removed, ${kept.length} kept${refs.length ? `; ${refsRemoved.length} live-restore reference(s) removed, ${refsKept.length} kept` : ''}`);
      });
    });
}
