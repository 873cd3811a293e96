/**
 * Prune sweeps the incomplete multipart uploads of killed puts on S3 (formats/repository.md §9.2 rule 6),
 * against Ceph RGW: only those under the repository's prefix (not another prefix, not one that merely
 * starts with the same letters), only those older than the temp grace by the storage's clock, each by its
 * upload id (a second, young upload of the same key survives); counted in the result with their parts'
 * bytes. The uploads are made with the minio client directly, as a killed writer leaves them.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Client } from 'minio';
import { randomBytes } from 'node:crypto';
import { pruneRepo } from '../../src/engines/prune.js';
import { openStore } from '../../src/objstore/open.js';
import { Repository } from '../../src/repo/repository.js';
import { closePool } from '../../src/compress/pool.js';
import { freshBucket, s3Config, s3Env, type S3TestConfig } from '../helpers/s3.js';

const MiB = 1024 * 1024;
let cfg: S3TestConfig;
let client: Client;
const bucket = freshBucket('sweep');

beforeAll(async () => {
  cfg = await s3Config();
  const u = new URL(cfg.endpoint);
  client = new Client({ endPoint: u.hostname, port: Number(u.port), useSSL: u.protocol === 'https:', region: cfg.region, pathStyle: true, accessKey: cfg.accessKey, secretKey: cfg.secretKey });
}, 300_000);
afterAll(() => closePool());

/** Starts a multipart upload of `name` and stores one part of `bytes`; returns its upload id. */
async function leaveUpload(name: string, bytes: number): Promise<string> {
  const id = await client.initiateNewMultipartUpload(bucket, name, {});
  await client.uploadPart({ bucketName: bucket, objectName: name, uploadID: id, partNumber: 1, headers: {} }, randomBytes(bytes));
  return id;
}

async function uploads(prefix: string): Promise<{ key: string; uploadId: string }[]> {
  const out: { key: string; uploadId: string }[] = [];
  for await (const u of client.listIncompleteUploads(bucket, prefix, true)) out.push({ key: u.key, uploadId: u.uploadId });
  return out.sort((a, b) => (a.key < b.key ? -1 : a.key > b.key ? 1 : 0));
}

describe('prune on S3', () => {
  it('aborts the old incomplete multipart uploads under the repository prefix, and only those', async () => {
    const store = await openStore(`s3://${bucket}/repo`, { create: true, env: s3Env(cfg) });
    const repo = await Repository.init(store, { chunkSize: MiB });
    try {
      const killed = await leaveUpload('repo/packs/ab/abababababababababababababababab.pack', 5 * MiB);
      await leaveUpload('repo/manifests/20240101T000000000Z-00000001', 1000);
      await leaveUpload('other/packs/ab/abababababababababababababababab.pack', 1000);
      await leaveUpload('repo2/packs/x.pack', 1000);
      expect((await uploads('')).length).toBe(4);
      // Young ones stay under the default grace (an hour).
      const young = await pruneRepo(repo, { last: 1 });
      expect([young.tempParts, young.tempBytes]).toEqual([0, 0]);
      expect((await uploads('')).length).toBe(4);
      // The storage's clock (the lock object's time, whole seconds on RGW) must pass their start.
      await new Promise((r) => setTimeout(r, 2500));
      // A live upload of the same key as a stale one, started after the sweep's cut-off: left alone.
      const live = await leaveUpload('repo/packs/ab/abababababababababababababababab.pack', 1000);
      const r = await pruneRepo(repo, { last: 1, tempGraceMs: 2000 });
      expect(r.tempParts).toBe(2);
      expect(r.tempBytes).toBe(5 * MiB + 1000);
      expect(r.bytesFreed).toBe(5 * MiB + 1000);
      const left = await uploads('');
      expect(left.map((u) => u.key)).toEqual(['other/packs/ab/abababababababababababababababab.pack', 'repo/packs/ab/abababababababababababababababab.pack', 'repo2/packs/x.pack']);
      expect(left.find((u) => u.key.startsWith('repo/'))!.uploadId).toBe(live);
      expect(live).not.toBe(killed);
    } finally {
      await store.close();
    }
  }, 300_000);
});
