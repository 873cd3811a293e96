// S3-only behaviour against a real Ceph RGW: credentials refused, a gateway that dies or hangs (its own
// radosgw, see privateGateway), a gateway killed in the middle of a multipart upload, configuration.
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { KscError } from '../../src/errors.js';
import { openStore, S3Store, s3ConfigFromEnv, type ObjectInfo, type ObjectStore, type RetryInfo } from '../../src/objstore/index.js';
import { freshBucket, freshPrefix, privateGateway, s3Config, s3Env, startGateway, stopGateway, type Gateway, type S3TestConfig } from '../helpers/s3.js';
import { tempDir } from '../helpers/tmp.js';

const MiB = 1024 * 1024;
const dir = tempDir('kscinc-s3-');

async function collect(it: AsyncIterable<ObjectInfo>): Promise<ObjectInfo[]> {
  const out: ObjectInfo[] = [];
  for await (const o of it) out.push(o);
  return out;
}

async function failure(p: Promise<unknown>): Promise<KscError> {
  const r = await p.then(
    () => null,
    (e: unknown) => e,
  );
  if (r === null) throw new Error('expected a failure, the call succeeded');
  return r as KscError;
}

// First: its bucket is created before any gateway is killed (a killed radosgw delays bucket creation).
describe('S3Store multipart tuning', () => {
  let store: ObjectStore;
  let parts: number[] = [];
  beforeAll(async () => {
    const cfg = await s3Config();
    store = await S3Store.open({ ...cfg, bucket: freshBucket('mp'), prefix: 'p' }, { multipartThreshold: 5 * MiB, partSize: 5 * MiB, concurrency: 3, onPart: (i) => parts.push(i.bytes) });
  });
  afterAll(async () => {
    await store?.close();
  });

  it('uses exact part sizes and reassembles many parts in order', async () => {
    parts = [];
    const data = Buffer.alloc(23 * MiB + 3);
    for (let i = 0; i + 4 <= data.length; i += 4096) data.writeUInt32BE(i / 4096, i);
    await store.put('m', data);
    expect([...parts].sort((a, b) => b - a)).toEqual([5 * MiB, 5 * MiB, 5 * MiB, 5 * MiB, 3 * MiB + 3]);
    expect((await store.get('m')).equals(data)).toBe(true);
    parts = [];
    await store.put('at-threshold', Buffer.alloc(5 * MiB, 1)); // not above the threshold: one PUT
    expect(parts).toEqual([]);
  });
});

describe('S3Store against Ceph RGW', () => {
  let cfg: S3TestConfig;
  let gw: Gateway;
  const bucket = freshBucket('s3t');

  beforeAll(async () => {
    cfg = await s3Config();
    gw = await privateGateway();
    // The bucket exists before the tests that use the private gateway.
    await (await openStore(`s3://${bucket}`, { env: s3Env(cfg), create: true })).close();
  });
  afterAll(async () => {
    await gw?.close();
  });

  it('refuses a wrong secret with KSC_E_AUTH quickly, and never shows the secret', async () => {
    const secret = 'not-the-secret-0123456789abcdef';
    const t0 = Date.now();
    const err = await failure(openStore(`s3://${bucket}/x`, { env: s3Env({ ...cfg, secretKey: secret }), create: true }));
    expect(err.code).toBe('KSC_E_AUTH');
    expect(err.retryable).toBe(false);
    expect(err.message).toContain(`S3 refused the credentials for s3://${bucket}/x`);
    expect(err.message).not.toContain(secret);
    expect(err.message).not.toContain(cfg.secretKey);
    expect(Date.now() - t0).toBeLessThan(10_000); // the default retry budget (~30 s) was not spent
    const wrongKey = await failure(openStore(`s3://${bucket}/x`, { env: s3Env({ ...cfg, accessKey: 'NOSUCHKEY0000' }) }));
    expect(wrongKey.code).toBe('KSC_E_AUTH');
  });

  it('refuses data operations with a wrong secret too (bucket already checked)', async () => {
    const store = await S3Store.open({ ...cfg, bucket, prefix: 'p', secretKey: 'wrong-secret-value' }, { create: false }).then(
      (s) => s,
      (e: KscError) => e,
    );
    // open checks the bucket, so the refusal comes there at the latest
    expect((store as KscError).code).toBe('KSC_E_AUTH');
  });

  it('a missing bucket is KSC_E_NOT_FOUND unless create', async () => {
    const name = freshBucket('missing');
    const err = await failure(openStore(`s3://${name}/p`, { env: s3Env(cfg) }));
    expect(err.code).toBe('KSC_E_NOT_FOUND');
    expect(err.message).toContain(name);
    const store = await openStore(`s3://${name}/p`, { env: s3Env(cfg), create: true });
    await store.put('k', Buffer.from('v'));
    await store.close();
    const again = await openStore(`s3://${name}/p`, { env: s3Env(cfg), create: true }); // exists: fine
    expect((await again.get('k')).toString()).toBe('v');
    await again.close();
  });

  it('prefixes isolate stores in one bucket', async () => {
    const a = await openStore(`s3://${bucket}/iso/a`, { env: s3Env(cfg) });
    const b = await openStore(`s3://${bucket}/iso/ab`, { env: s3Env(cfg) });
    await a.put('k', Buffer.from('a'));
    await b.put('k', Buffer.from('b'));
    expect((await collect(a.list(''))).map((o) => o.key)).toEqual(['k']);
    expect((await a.get('k')).toString()).toBe('a');
    expect((await b.get('k')).toString()).toBe('b');
    await a.close();
    await b.close();
  });

  it('gateway down: KSC_E_UNAVAILABLE after the retry budget; back up: works again', async () => {
    const retries: RetryInfo[] = [];
    const store = await openStore(`s3://${bucket}/${freshPrefix()}`, {
      env: s3Env(gw.config),
      retry: { retries: 3, baseMs: 50, maxMs: 200, onRetry: (i) => retries.push(i) },
    });
    await store.put('k', Buffer.from('value'));
    await stopGateway(gw);
    try {
      const t0 = Date.now();
      const err = await failure(store.get('k'));
      expect(err.code).toBe('KSC_E_UNAVAILABLE');
      expect(err.retryable).toBe(true);
      expect(err.message).toContain(gw.config.endpoint);
      expect(err.message).not.toContain(cfg.secretKey);
      expect(retries.map((r) => r.attempt)).toEqual([1, 2, 3]);
      expect(Date.now() - t0).toBeLessThan(5000);
      expect((await failure(store.put('k2', Buffer.from('x')))).code).toBe('KSC_E_UNAVAILABLE');
      expect((await failure(collect(store.list('')))).code).toBe('KSC_E_UNAVAILABLE');
    } finally {
      await startGateway(gw);
    }
    expect((await store.get('k')).toString()).toBe('value');
    expect(await store.stat('k2')).toBeNull();
    await store.close();
  });

  it('gateway hanging (SIGSTOP): the request timeout turns it into KSC_E_UNAVAILABLE', async () => {
    const store = await openStore(`s3://${bucket}/${freshPrefix()}`, {
      env: s3Env(gw.config),
      retry: { retries: 1, baseMs: 50 },
      s3Options: { requestTimeoutMs: 400 },
    });
    await store.put('k', Buffer.from('value'));
    gw.signal('SIGSTOP');
    try {
      const t0 = Date.now();
      const err = await failure(store.get('k'));
      expect(err.code).toBe('KSC_E_UNAVAILABLE');
      expect(Date.now() - t0).toBeLessThan(10_000); // not hung
    } finally {
      gw.signal('SIGCONT');
    }
    expect((await store.get('k')).toString()).toBe('value');
    await store.close();
  });

  it('gateway killed during a multipart put: the put fails cleanly, nothing visible; a retry succeeds', async () => {
    const data = Buffer.alloc(80 * MiB);
    for (let i = 0; i < data.length; i += 512) data.writeUInt32LE(i, i);
    let partsDone = 0;
    let crashed: Promise<void> | undefined;
    const store = await openStore(`s3://${bucket}/${freshPrefix()}`, {
      env: s3Env(gw.config),
      retry: { retries: 2, baseMs: 100 },
      // SIGKILL right when the first part is stored, while the next ones are in flight
      s3Options: {
        onPart: () => {
          if (partsDone++ === 0) crashed = gw.crash();
        },
      },
    });
    await store.put('before', Buffer.from('kept'));
    const err = await failure(store.put('big', data));
    await crashed;
    expect(partsDone).toBeGreaterThanOrEqual(1);
    expect(partsDone).toBeLessThan(5); // it really died mid-upload
    expect(err.code).toBe('KSC_E_UNAVAILABLE');
    await startGateway(gw);
    expect(await store.stat('big')).toBeNull();
    expect(await failure(store.get('big')).then((e) => e.code)).toBe('KSC_E_NOT_FOUND');
    expect((await collect(store.list(''))).map((o) => o.key)).toEqual(['before']);
    await store.put('big', data);
    expect((await store.get('big')).equals(data)).toBe(true);
    await store.close();
  });

  it('gateway killed during a multipart put and back within the retry budget: the put completes', async () => {
    const data = Buffer.alloc(48 * MiB);
    for (let i = 0; i < data.length; i += 512) data.writeUInt32LE(i ^ 0x5a5a5a5a, i);
    let outage: Promise<void> | undefined;
    const retried: RetryInfo[] = [];
    const store = await openStore(`s3://${bucket}/${freshPrefix()}`, {
      env: s3Env(gw.config),
      retry: { retries: 8, baseMs: 250, maxMs: 2000, onRetry: (i) => retried.push(i) },
      s3Options: {
        onPart: () => {
          if (outage) return;
          outage = gw
            .crash()
            .then(() => new Promise((r) => setTimeout(r, 300)))
            .then(() => startGateway(gw));
        },
      },
    });
    try {
      await store.put('big', data);
    } finally {
      await outage;
    }
    expect(retried.length).toBeGreaterThanOrEqual(1);
    expect(retried.every((r) => r.op === 'put')).toBe(true);
    const st = await store.stat('big');
    expect(st?.size).toBe(data.length);
    expect((await store.get('big')).equals(data)).toBe(true);
    await store.close();
  });

  it('configuration comes from KSCINC_S3_CONFIG and the environment, never from the location', async () => {
    const file = join(dir, 's3.json');
    writeFileSync(file, JSON.stringify({ endpoint: cfg.endpoint, region: cfg.region, accessKey: cfg.accessKey, secretKey: cfg.secretKey, pathStyle: true }));
    const store = await openStore(`s3://${bucket}/cfg`, { env: { KSCINC_S3_CONFIG: file }, create: true });
    await store.put('k', Buffer.from('from file'));
    expect((await store.get('k')).toString()).toBe('from file');
    await store.close();

    // the environment wins over the file
    const c = s3ConfigFromEnv('b', 'p', {
      KSCINC_S3_CONFIG: file,
      AWS_ACCESS_KEY_ID: 'envkey',
      AWS_SECRET_ACCESS_KEY: 'envsecret',
      AWS_DEFAULT_REGION: 'eu-west-3',
      KSCINC_S3_ENDPOINT: 'https://s3.example.net',
    });
    expect(c).toMatchObject({ accessKey: 'envkey', secretKey: 'envsecret', region: 'eu-west-3', endpoint: 'https://s3.example.net', bucket: 'b', prefix: 'p', pathStyle: true });
    expect(s3ConfigFromEnv('b', '', { KSCINC_S3_CONFIG: file, AWS_REGION: 'r1', AWS_DEFAULT_REGION: 'r2' }).region).toBe('r1');

    const missing = (() => {
      try {
        s3ConfigFromEnv('b', 'p', {});
      } catch (e) {
        return e as KscError;
      }
      return null;
    })();
    expect(missing?.code).toBe('KSC_E_INVALID');
    expect(missing?.message).toContain('AWS_ACCESS_KEY_ID');

    writeFileSync(join(dir, 'typo.json'), JSON.stringify({ endpoint: cfg.endpoint, secretkey: 'x' }));
    expect((await failure(openStore(`s3://${bucket}`, { env: { KSCINC_S3_CONFIG: join(dir, 'typo.json') } }))).message).toContain('unknown field "secretkey"');
    expect((await failure(openStore(`s3://${bucket}`, { env: { KSCINC_S3_CONFIG: join(dir, 'none.json') } }))).code).toBe('KSC_E_INVALID');
    expect((await failure(openStore(`s3://${bucket}`, { env: { ...s3Env(cfg), KSCINC_S3_ENDPOINT: 'ftp://host' } }))).code).toBe('KSC_E_INVALID');

    const withCreds = await failure(openStore(`s3://AKIA:topsecret@${bucket}/p`, { env: s3Env(cfg) }));
    expect(withCreds.code).toBe('KSC_E_INVALID');
    expect(withCreds.message).not.toContain('topsecret');
  });

  it('connection refused at open is KSC_E_UNAVAILABLE after the budget', async () => {
    const retries: RetryInfo[] = [];
    const err = await failure(
      openStore(`s3://${bucket}`, {
        env: { ...s3Env(cfg), KSCINC_S3_ENDPOINT: 'http://127.0.0.1:1' },
        retry: { retries: 2, baseMs: 20, onRetry: (i) => retries.push(i) },
      }),
    );
    expect(err.code).toBe('KSC_E_UNAVAILABLE');
    expect(retries.length).toBe(2);
  });
});
