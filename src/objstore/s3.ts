/**
 * ObjectStore over S3 (AWS, Ceph RGW, MinIO, any S3-compatible endpoint) with the `minio` v8 client.
 *
 * Design notes.
 * - Key K is the object PREFIX/K in BUCKET. A put up to `multipartThreshold` is one PUT; a larger one is a
 *   multipart upload driven with the client's low-level calls (its putObject resumes a stranger's upload of
 *   the same key and sends parts one at a time), `concurrency` parts in flight, aborted on any failure, so
 *   the object appears whole at CompleteMultipartUpload or not at all. Memory stays at most
 *   concurrency × partSize beyond the caller's buffers.
 * - The client's own retry loop is off: it prints to the console and turns a 5xx into a bare Error.
 *   Retrying is the job of the `withRetry` wrapper, which only needs `retryable` on the errors made here.
 * - Every request has an idle timeout, so a gateway that stops answering becomes KSC_E_UNAVAILABLE instead
 *   of a hang.
 * - Credentials come from the environment or a config file (`s3ConfigFromEnv`), never from a location
 *   string; no message ever carries the secret.
 */
import { readFileSync } from 'node:fs';
import * as http from 'node:http';
import * as https from 'node:https';
import type { Readable } from 'node:stream';
import { Client } from 'minio';
import { KscError } from '../errors.js';
import { extraCaOptions } from './extra-ca.js';
import { assertKey, assertRange, bodyBuffer, bodySize, isStreamBody, shortObject, type Body, type ObjectInfo, type ObjectStore, type StreamBody } from './types.js';

const MiB = 1024 * 1024;
const MAX_PARTS = 10_000;

export interface S3Config {
  /** http(s)://host[:port]; default https://s3.amazonaws.com. */
  endpoint?: string;
  /** Default us-east-1. */
  region?: string;
  bucket: string;
  /** Folder-like prefix inside the bucket, without leading or trailing '/'; '' for the bucket's root. */
  prefix?: string;
  /** Path-style requests (http://host/bucket/key); default true. False: virtual-hosted (bucket.host). */
  pathStyle?: boolean;
  accessKey: string;
  secretKey: string;
  sessionToken?: string;
}

export interface S3StoreOptions {
  /** Create the bucket when missing (default true); otherwise a missing bucket is KSC_E_NOT_FOUND. */
  create?: boolean;
  /**
   * False: no request at open (the bucket is not checked; a missing one, refused credentials or an
   * unreachable endpoint fail the first request, with the same errors). For a caller whose first requests
   * go out at once and which wants no round trip before them (a live restore's open, issue 18). Default
   * true; ignored with `create`.
   */
  check?: boolean;
  /** Bodies above this many bytes go up as multipart uploads (default 16 MiB). */
  multipartThreshold?: number;
  /** Multipart part size (default 16 MiB, at least 5 MiB; grown when an object would need > 10000 parts). */
  partSize?: number;
  /** Parts in flight per multipart upload (default 4). */
  concurrency?: number;
  /** A request with no byte moving for this long fails as KSC_E_UNAVAILABLE (default 60 s). */
  requestTimeoutMs?: number;
  /** Called after each multipart part is stored (progress, and tests that act mid-upload). */
  onPart?: (info: { key: string; part: number; parts: number; bytes: number }) => void;
}

/** The fields a KSCINC_S3_CONFIG file may hold. */
const FILE_FIELDS = ['endpoint', 'region', 'accessKey', 'secretKey', 'sessionToken', 'pathStyle'] as const;

/**
 * Builds the configuration for s3://bucket/prefix from the environment: a JSON file named by
 * KSCINC_S3_CONFIG (fields endpoint, region, accessKey, secretKey, sessionToken, pathStyle), overridden by
 * KSCINC_S3_ENDPOINT, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION or
 * AWS_DEFAULT_REGION, all overridden by `overrides`. KSC_E_INVALID when the file is unreadable or the credentials are missing.
 */
export function s3ConfigFromEnv(bucket: string, prefix = '', env: NodeJS.ProcessEnv = process.env, overrides: Partial<Omit<S3Config, 'bucket' | 'prefix'>> = {}): S3Config {
  const file: Partial<Record<(typeof FILE_FIELDS)[number], unknown>> = {};
  const path = env.KSCINC_S3_CONFIG;
  if (path) {
    let parsed: unknown;
    try {
      parsed = JSON.parse(readFileSync(path, 'utf8'));
    } catch (e) {
      throw new KscError('KSC_E_INVALID', `S3 config file ${path} (KSCINC_S3_CONFIG): ${(e as Error).message}`, { cause: e });
    }
    if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) {
      throw new KscError('KSC_E_INVALID', `S3 config file ${path}: not a JSON object`);
    }
    for (const [k, v] of Object.entries(parsed)) {
      if (!(FILE_FIELDS as readonly string[]).includes(k)) {
        throw new KscError('KSC_E_INVALID', `S3 config file ${path}: unknown field "${k}" (known: ${FILE_FIELDS.join(', ')})`);
      }
      const want = k === 'pathStyle' ? 'boolean' : 'string';
      if (typeof v !== want) throw new KscError('KSC_E_INVALID', `S3 config file ${path}: "${k}" must be a ${want}`);
      file[k as (typeof FILE_FIELDS)[number]] = v;
    }
  }
  const str = (v: unknown): string | undefined => (typeof v === 'string' && v !== '' ? v : undefined);
  const accessKey = str(overrides.accessKey) ?? str(env.AWS_ACCESS_KEY_ID) ?? str(file.accessKey);
  const secretKey = str(overrides.secretKey) ?? str(env.AWS_SECRET_ACCESS_KEY) ?? str(file.secretKey);
  if (!accessKey || !secretKey) {
    throw new KscError(
      'KSC_E_INVALID',
      `no S3 credentials for s3://${bucket}${prefix ? `/${prefix}` : ''}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or accessKey and secretKey in the file named by KSCINC_S3_CONFIG`,
    );
  }
  return {
    endpoint: str(overrides.endpoint) ?? str(env.KSCINC_S3_ENDPOINT) ?? str(file.endpoint),
    region: str(overrides.region) ?? str(env.AWS_REGION) ?? str(env.AWS_DEFAULT_REGION) ?? str(file.region),
    bucket,
    prefix,
    pathStyle: overrides.pathStyle ?? (typeof file.pathStyle === 'boolean' ? file.pathStyle : undefined),
    accessKey,
    secretKey,
    sessionToken: str(overrides.sessionToken) ?? str(env.AWS_SESSION_TOKEN) ?? str(file.sessionToken),
  };
}

interface Endpoint {
  secure: boolean;
  host: string;
  port: number;
  url: string;
}

function parseEndpoint(endpoint: string | undefined): Endpoint {
  const text = endpoint ?? 'https://s3.amazonaws.com';
  let u: URL;
  try {
    u = new URL(text);
  } catch {
    throw new KscError('KSC_E_INVALID', `bad S3 endpoint "${text}": expected http(s)://host[:port]`);
  }
  if ((u.protocol !== 'http:' && u.protocol !== 'https:') || u.username || u.password || (u.pathname !== '/' && u.pathname !== '') || u.search) {
    throw new KscError('KSC_E_INVALID', `bad S3 endpoint "${u.protocol}//${u.host}${u.pathname}": expected http(s)://host[:port] with no path or credentials`);
  }
  const secure = u.protocol === 'https:';
  const host = u.hostname.replace(/^\[(.*)\]$/, '$1');
  return { secure, host, port: u.port ? Number(u.port) : secure ? 443 : 80, url: `${u.protocol}//${u.host}` };
}

/** Network failures that mean "try again later". */
const TRANSIENT_ERRNO = new Set(['ECONNREFUSED', 'ECONNRESET', 'ECONNABORTED', 'ETIMEDOUT', 'EPIPE', 'EHOSTUNREACH', 'ENETUNREACH', 'ENETDOWN', 'EAI_AGAIN', 'ESOCKETTIMEDOUT', 'UND_ERR_SOCKET']);
/** S3 error codes that mean "try again later" ('' is a 5xx without an error body, e.g. on HEAD). */
const TRANSIENT_S3 = new Set(['', 'InternalError', 'ServiceUnavailable', 'SlowDown', 'RequestTimeout', 'OperationAborted', 'RequestTimeTooSkewed']);
const AUTH_S3 = new Set(['InvalidAccessKeyId', 'SignatureDoesNotMatch', 'AccessDenied', 'ExpiredToken', 'InvalidToken', 'TokenRefreshRequired', 'AuthorizationHeaderMalformed', 'AllAccessDisabled']);
const NOT_FOUND_S3 = new Set(['NoSuchKey', 'NotFound', 'NoSuchBucket', 'NoSuchUpload']);

export class S3Store implements ObjectStore {
  readonly name: string;
  readonly bucket: string;
  readonly prefix: string;
  private readonly client: Client;
  private readonly agent: http.Agent;
  private readonly endpoint: Endpoint;
  private readonly threshold: number;
  private readonly partSize: number;
  private readonly concurrency: number;
  private readonly onPart: S3StoreOptions['onPart'];

  private constructor(config: S3Config, opts: S3StoreOptions) {
    this.bucket = config.bucket;
    this.prefix = (config.prefix ?? '').replace(/^\/+|\/+$/g, '');
    this.name = `s3://${this.bucket}${this.prefix ? `/${this.prefix}` : ''}`;
    if (this.prefix !== '') assertKey(this.name, this.prefix);
    this.endpoint = parseEndpoint(config.endpoint);
    this.threshold = opts.multipartThreshold ?? 16 * MiB;
    this.partSize = Math.max(5 * MiB, opts.partSize ?? 16 * MiB);
    this.concurrency = Math.max(1, opts.concurrency ?? 4);
    this.onPart = opts.onPart;
    const timeout = opts.requestTimeoutMs ?? 60_000;
    const lib = this.endpoint.secure ? https : http;
    // The `kscinc` executable leaves NODE_EXTRA_CA_CERTS for the first TLS connection (extra-ca.ts).
    this.agent = this.endpoint.secure ? new https.Agent({ keepAlive: true, maxSockets: 32, ...extraCaOptions() }) : new http.Agent({ keepAlive: true, maxSockets: 32 });
    const request = (options: http.RequestOptions, cb?: (res: http.IncomingMessage) => void): http.ClientRequest => {
      const req = lib.request(options, cb);
      req.setTimeout(timeout, () => {
        req.destroy(Object.assign(new Error(`no response for ${timeout} ms`), { code: 'ETIMEDOUT' }));
      });
      return req;
    };
    this.client = new Client({
      endPoint: this.endpoint.host,
      port: this.endpoint.port,
      useSSL: this.endpoint.secure,
      region: config.region ?? 'us-east-1',
      pathStyle: config.pathStyle ?? true,
      accessKey: config.accessKey,
      secretKey: config.secretKey,
      sessionToken: config.sessionToken,
      transport: { request } as unknown as typeof http,
      transportAgent: this.agent,
      retryOptions: { disableRetry: true },
    });
  }

  /**
   * Connects to the bucket (creating it when missing unless `create` is false). KSC_E_AUTH when the
   * credentials are refused, KSC_E_UNAVAILABLE (retryable) when the endpoint cannot be reached.
   */
  static async open(config: S3Config, opts: S3StoreOptions = {}): Promise<S3Store> {
    if (!config.bucket) throw new KscError('KSC_E_INVALID', 'S3 bucket name is empty');
    const store = new S3Store(config, opts);
    if (opts.check === false && opts.create === false) return store;
    try {
      await store.ensureBucket(opts.create ?? true);
    } catch (e) {
      await store.close();
      throw e;
    }
    return store;
  }

  private async ensureBucket(create: boolean): Promise<void> {
    // bucketExists first: makeBucket on an existing bucket is 200 on RGW but an error elsewhere.
    if (await this.call('open', '', () => this.client.bucketExists(this.bucket))) return;
    if (!create) throw new KscError('KSC_E_NOT_FOUND', `${this.name}: bucket ${this.bucket} does not exist`);
    try {
      await this.client.makeBucket(this.bucket, this.client.region ?? 'us-east-1');
    } catch (e) {
      const code = (e as { code?: string }).code;
      if (code === 'BucketAlreadyOwnedByYou' || code === 'BucketAlreadyExists') return;
      throw this.mapError(e, 'create bucket', '');
    }
  }

  private objectName(key: string): string {
    assertKey(this.name, key);
    return this.prefix ? `${this.prefix}/${key}` : key;
  }

  async put(key: string, data: Body): Promise<void> {
    const name = this.objectName(key);
    const size = bodySize(data);
    if (size <= this.threshold) {
      const body = bodyBuffer(data);
      if (body.length !== size) throw new KscError('KSC_E_INVALID', `${this.name}: put ${key}: the body made ${body.length} bytes, not the ${size} it declared`);
      await this.call('put', key, () => this.client.putObject(this.bucket, name, body, size));
      return;
    }
    await this.putMultipart(key, name, data, size);
  }

  private async putMultipart(key: string, name: string, data: Body, size: number): Promise<void> {
    // Parts are cut in order, each when a worker starts it (a stream body is read as it goes).
    const take = isStreamBody(data) ? sequentialTake(data, this.name, key) : (offset: number, length: number) => gather(Array.isArray(data) ? data : [data], offset, length);
    const partSize = Math.max(this.partSize, Math.ceil(size / MAX_PARTS / MiB) * MiB);
    const count = Math.ceil(size / partSize);
    const uploadId = await this.call('put', key, () => this.client.initiateNewMultipartUpload(this.bucket, name, {}));
    const etags: { part: number; etag: string }[] = new Array(count);
    let next = 0;
    let failure: unknown;
    const worker = async (): Promise<void> => {
      while (failure === undefined && next < count) {
        const n = next++;
        const offset = n * partSize;
        const length = Math.min(partSize, size - offset);
        try {
          const res = await this.client.uploadPart({ bucketName: this.bucket, objectName: name, uploadID: uploadId, partNumber: n + 1, headers: {} }, take(offset, length));
          etags[n] = { part: n + 1, etag: res.etag };
          this.onPart?.({ key, part: n + 1, parts: count, bytes: length });
        } catch (e) {
          failure ??= e;
        }
      }
    };
    try {
      // Every worker stops before the abort, so no part lands in an upload already aborted.
      await Promise.all(Array.from({ length: Math.min(this.concurrency, count) }, worker));
      if (failure !== undefined) throw failure;
      await this.client.completeMultipartUpload(this.bucket, name, uploadId, etags);
    } catch (e) {
      await this.client.abortMultipartUpload(this.bucket, name, uploadId).catch(() => undefined);
      throw this.mapError(e, 'put', key);
    }
  }

  async get(key: string): Promise<Buffer> {
    const name = this.objectName(key);
    return this.call('get', key, async () => readAll(await this.client.getObject(this.bucket, name)));
  }

  async getUpTo(key: string, max: number): Promise<Buffer> {
    const name = this.objectName(key);
    assertRange(this.name, key, 0, max);
    if (max === 0) {
      if (!(await this.stat(key))) throw new KscError('KSC_E_NOT_FOUND', `${this.name}: no object ${key}`);
      return Buffer.alloc(0);
    }
    try {
      // A range past the end is answered with the bytes there are (an empty object: InvalidRange).
      // At most max + 1 bytes taken from the answer, whatever it says (a gateway that ignores the Range
      // answers the whole object): one more than asked for is damage, and the rest is never read.
      const buf = await this.call('get', key, async () => readAtMost(await this.client.getPartialObject(this.bucket, name, 0, max), max + 1));
      if (buf.length > max) throw new KscError('KSC_E_CORRUPT', `${this.name}: object ${key}: more than the ${max} bytes asked for answered: not read further`);
      return buf;
    } catch (e) {
      if ((e as { cause?: { code?: string } }).cause?.code === 'InvalidRange') {
        const st = await this.stat(key);
        if (st?.size === 0) return Buffer.alloc(0);
      }
      throw e;
    }
  }

  async getRange(key: string, offset: number, length: number): Promise<Buffer> {
    const name = this.objectName(key);
    assertRange(this.name, key, offset, length);
    if (length === 0) {
      // The client reads "length 0" as "to the end": check the range against the size instead.
      const st = await this.stat(key);
      if (!st) throw new KscError('KSC_E_NOT_FOUND', `${this.name}: no object ${key}`);
      if (offset > st.size) throw shortObject(this.name, key, offset, length, st.size);
      return Buffer.alloc(0);
    }
    let buf: Buffer;
    try {
      buf = await this.call('getRange', key, async () => readAll(await this.client.getPartialObject(this.bucket, name, offset, length)));
    } catch (e) {
      if ((e as { cause?: { code?: string } }).cause?.code === 'InvalidRange') {
        const st = await this.stat(key);
        if (!st) throw e;
        throw shortObject(this.name, key, offset, length, st.size);
      }
      throw e;
    }
    if (buf.length !== length) throw shortObject(this.name, key, offset, length, offset + buf.length);
    return buf;
  }

  async stat(key: string): Promise<ObjectInfo | null> {
    const name = this.objectName(key);
    try {
      const st = await this.call('stat', key, () => this.client.statObject(this.bucket, name));
      return { key, size: st.size, mtimeMs: st.lastModified.getTime() };
    } catch (e) {
      if ((e as KscError).code === 'KSC_E_NOT_FOUND') return null;
      throw e;
    }
  }

  async *list(prefix: string): AsyncIterable<ObjectInfo> {
    const full = this.prefix ? `${this.prefix}/${prefix}` : prefix;
    const cut = this.prefix ? this.prefix.length + 1 : 0;
    try {
      for await (const item of this.client.listObjectsV2(this.bucket, full, true)) {
        const it = item as { name?: string; size: number; lastModified?: Date };
        if (it.name === undefined) continue; // a common prefix: none in a recursive listing
        yield { key: it.name.slice(cut), size: it.size, mtimeMs: it.lastModified?.getTime() ?? 0 };
      }
    } catch (e) {
      throw this.mapError(e, 'list', prefix);
    }
  }

  async delete(key: string): Promise<void> {
    const name = this.objectName(key);
    try {
      await this.call('delete', key, () => this.client.removeObject(this.bucket, name));
    } catch (e) {
      // A missing key is success; a missing bucket is not.
      if ((e as KscError).code === 'KSC_E_NOT_FOUND' && (e as { cause?: { code?: string } }).cause?.code !== 'NoSuchBucket') return;
      throw e;
    }
  }

  /**
   * Aborts the incomplete multipart uploads under this store's prefix started more than `olderThanMs`
   * before `now` (storage time; default this host's clock): the parts of puts that were killed (a put that
   * fails aborts its own). Each is aborted by its upload id, never by key, so a live upload of the same
   * key is left alone. Returns how many and the bytes their parts held.
   */
  async sweepTemp(olderThanMs = 24 * 3600_000, now?: number): Promise<{ count: number; bytes: number }> {
    const within = this.prefix ? `${this.prefix}/` : '';
    const t = now ?? Date.now();
    const old: { key: string; uploadId: string; size: number }[] = [];
    try {
      for await (const item of this.client.listIncompleteUploads(this.bucket, within, true)) {
        const u = item as { key?: string; uploadId?: string; size?: number; initiated?: Date };
        if (typeof u.key !== 'string' || typeof u.uploadId !== 'string' || !u.key.startsWith(within)) continue;
        const started = u.initiated instanceof Date ? u.initiated.getTime() : Number.NaN;
        if (!(t - started > olderThanMs)) continue; // unknown age: left alone
        old.push({ key: u.key, uploadId: u.uploadId, size: u.size ?? 0 });
      }
    } catch (e) {
      throw this.mapError(e, 'list incomplete uploads', within);
    }
    let bytes = 0;
    let count = 0;
    for (const u of old) {
      try {
        await this.call('abort upload', u.key, () => this.client.abortMultipartUpload(this.bucket, u.key, u.uploadId));
      } catch (e) {
        if ((e as { cause?: { code?: string } }).cause?.code === 'NoSuchUpload') continue; // gone meanwhile
        throw e;
      }
      count++;
      bytes += u.size;
    }
    return { count, bytes };
  }

  async close(): Promise<void> {
    this.agent.destroy();
  }

  private async call<T>(what: string, key: string, fn: () => Promise<T>): Promise<T> {
    try {
      return await fn();
    } catch (e) {
      throw this.mapError(e, what, key);
    }
  }

  /** One place that turns client, S3 and socket errors into KscError codes. Never includes the secret. */
  private mapError(e: unknown, what: string, key: string): KscError {
    if (e instanceof KscError) return e;
    const err = e as { code?: unknown; message?: unknown; name?: unknown };
    const code = typeof err.code === 'string' ? err.code : '';
    const detail = `${code ? `${code}: ` : ''}${typeof err.message === 'string' ? err.message : String(e)}`;
    const op = key ? `${what} ${key}` : what;
    const isS3 = err.name === 'S3Error';
    if (isS3 && AUTH_S3.has(code)) {
      return new KscError('KSC_E_AUTH', `S3 refused the credentials for ${this.name}: ${detail}`, { cause: e });
    }
    if (isS3 && NOT_FOUND_S3.has(code)) {
      const msg = code === 'NoSuchBucket' ? `bucket ${this.bucket} does not exist` : `no object ${key}`;
      return new KscError('KSC_E_NOT_FOUND', `${this.name}: ${msg}`, { cause: e });
    }
    if ((isS3 && TRANSIENT_S3.has(code)) || TRANSIENT_ERRNO.has(code) || /socket hang up|aborted|response cut short/i.test(detail)) {
      return new KscError('KSC_E_UNAVAILABLE', `${this.name}: ${op} failed: S3 endpoint ${this.endpoint.url} unavailable (${detail})`, { cause: e, retryable: true });
    }
    if (code === 'ENOTFOUND') {
      return new KscError('KSC_E_UNAVAILABLE', `${this.name}: S3 endpoint ${this.endpoint.url} not found (${detail})`, { cause: e });
    }
    if (/^Invalid(BucketName|ObjectName|Prefix|Argument|Endpoint|Port)Error$/.test(String(err.name))) {
      return new KscError('KSC_E_INVALID', `${this.name}: ${op}: ${detail}`, { cause: e });
    }
    return new KscError('KSC_E_IO', `${this.name}: ${op} failed: ${detail}`, { cause: e });
  }
}

/** Cuts a stream body's bytes in order: each call must ask for the bytes right after the previous call's. */
function sequentialTake(body: StreamBody, store: string, key: string): (offset: number, length: number) => Buffer {
  const it = body.parts()[Symbol.iterator]();
  let pos = 0;
  let rest: Buffer = Buffer.alloc(0);
  return (offset, length) => {
    if (offset !== pos) throw new Error(`${store}: put ${key}: stream body asked for offset ${offset} at ${pos}`);
    const pieces: Buffer[] = [];
    let have = 0;
    while (have < length) {
      if (rest.length === 0) {
        const n = it.next();
        if (n.done) throw new KscError('KSC_E_INVALID', `${store}: put ${key}: the body ended at ${pos + have} of ${body.size} bytes`);
        rest = n.value;
        continue;
      }
      const piece = rest.subarray(0, length - have);
      rest = rest.subarray(piece.length);
      pieces.push(piece);
      have += piece.length;
    }
    pos += length;
    if (pos === body.size && (rest.length > 0 || !it.next().done)) throw new KscError('KSC_E_INVALID', `${store}: put ${key}: the body made more than the ${body.size} bytes it declared`);
    return pieces.length === 1 ? pieces[0]! : Buffer.concat(pieces, length);
  };
}

/** `length` bytes at `offset` of the concatenation of `bufs`, copying only when the range spans buffers. */
function gather(bufs: Buffer[], offset: number, length: number): Buffer {
  const pieces: Buffer[] = [];
  let pos = 0;
  for (const b of bufs) {
    const end = pos + b.length;
    if (end > offset && pos < offset + length) {
      pieces.push(b.subarray(Math.max(0, offset - pos), Math.min(b.length, offset + length - pos)));
    }
    pos = end;
    if (pos >= offset + length) break;
  }
  return pieces.length === 1 ? pieces[0]! : Buffer.concat(pieces, length);
}

/**
 * The first `limit` bytes of `stream` (all of it when shorter); destroyed once it gave that many. A body shorter
 * than its Content-Length (connection cut) is a retryable failure.
 */
async function readAtMost(stream: Readable, limit: number): Promise<Buffer> {
  const chunks: Buffer[] = [];
  let n = 0;
  for await (const c of stream) {
    const b = c as Buffer;
    if (n + b.length >= limit) {
      chunks.push(b.subarray(0, limit - n));
      n = limit;
      stream.destroy();
      return Buffer.concat(chunks, n);
    }
    chunks.push(b);
    n += b.length;
  }
  const declared = Number((stream as Partial<http.IncomingMessage>).headers?.['content-length'] ?? NaN);
  if (Number.isFinite(declared) && declared !== n) {
    throw Object.assign(new Error(`response cut short: ${n} of ${declared} bytes`), { code: 'ECONNRESET' });
  }
  return Buffer.concat(chunks, n);
}

/** The whole body; a body shorter than its Content-Length (connection cut) is a retryable failure. */
async function readAll(stream: Readable): Promise<Buffer> {
  const chunks: Buffer[] = [];
  let n = 0;
  for await (const c of stream) {
    chunks.push(c as Buffer);
    n += (c as Buffer).length;
  }
  const declared = Number((stream as Partial<http.IncomingMessage>).headers?.['content-length'] ?? NaN);
  if (Number.isFinite(declared) && declared !== n) {
    throw Object.assign(new Error(`response cut short: ${n} of ${declared} bytes`), { code: 'ECONNRESET' });
  }
  return Buffer.concat(chunks, n);
}
