/**
 * Schedule files (YAML or JSON, told apart by content): parsing and validation. Every field is checked
 * here, once, with an error that names the file, the job and the field; the rest of the scheduler trusts
 * the result.
 */
import { readFile } from 'node:fs/promises';
import { dirname, isAbsolute, resolve } from 'node:path';
import { parseDocument } from 'yaml';
import { KscError, ioError } from '../../errors.js';
import { parseS3Url } from '../../objstore/open.js';
import { backupBitmapNameProblem } from '../backup/bitmap-names.js';
import { assertPolicy, type KeepPolicy } from '../retention.js';
import { parseDuration } from './duration.js';
import { TARGET_KEYS, parseReplicate, type ReplicaTarget } from './replicate-job.js';
import { parseWhen, type When } from './when.js';
import { checkZone, systemZone } from './zone.js';

export interface ScheduleJob {
  name: string;
  /** Paths or glob patterns, absolute (relative ones resolved against the config file's folder). */
  images: string[];
  /** A folder (absolute) or s3://BUCKET/PREFIX. */
  repo: string;
  /** Bitmap to back up from; undefined: the default ("backup"); null: none (every backup reads everything). */
  bitmap?: string | null;
  when: When;
  timezone: string;
  keep?: KeepPolicy;
  /** Recovery point objective in ms. */
  rpoMs?: number;
  /** As written, for display. */
  rpo?: string;
  tags: string[];
  /** false: a repository this job creates is not encrypted (YAML `encrypt: false`); default encrypted (repository.md §13.0). */
  encrypt?: false;
  /** A replication job (formats/migrate.md §11): one cycle to this NBD URI per run instead of a backup; `repo` is the URI too. */
  replicate?: string;
  /** A replication job's target options (token, TLS, bandwidth…: formats/schedule.md §1.1). */
  target?: ReplicaTarget;
}

export interface ScheduleConfig {
  /** The config file (absolute), or "<inline>". */
  file: string;
  timezone: string;
  parallel: number;
  jobs: ScheduleJob[];
}

const TOP_KEYS = new Set(['timezone', 'parallel', 'jobs']);
const JOB_KEYS = new Set(['name', 'images', 'repo', 'bitmap', 'when', 'keep', 'rpo', 'timezone', 'tags', 'encrypt', 'replicate', ...TARGET_KEYS]);
const KEEP_KEYS = new Set(['last', 'daily', 'weekly', 'monthly']);
export const MAX_PARALLEL = 64;

type Obj = Record<string, unknown>;

const isObj = (v: unknown): v is Obj => typeof v === 'object' && v !== null && !Array.isArray(v);
const describe = (v: unknown): string => (v === null ? 'null' : Array.isArray(v) ? 'a list' : typeof v === 'string' ? `"${v}"` : typeof v === 'object' ? 'a mapping' : String(v));

function invalid(where: string, msg: string): KscError {
  return new KscError('KSC_E_INVALID', `${where}: ${msg}`);
}

function assertKnownKeys(o: Obj, allowed: Set<string>, where: string): void {
  for (const k of Object.keys(o)) {
    if (!allowed.has(k)) throw invalid(where, `unknown field "${k}" (allowed: ${[...allowed].join(', ')})`);
  }
}

/** Reads the text as JSON when it starts with "{", else as YAML (1.2, which JSON is a subset of). */
function parseText(text: string, file: string): unknown {
  if (text.trimStart().startsWith('{')) {
    try {
      return JSON.parse(text);
    } catch (e) {
      throw invalid(file, `not valid JSON: ${(e as Error).message}`);
    }
  }
  const doc = parseDocument(text, { prettyErrors: true, uniqueKeys: true });
  if (doc.errors.length > 0) throw invalid(file, `not valid YAML: ${doc.errors[0]!.message.split('\n')[0]}`);
  return doc.toJS({ maxAliasCount: 100 });
}

function str(v: unknown, where: string, field: string): string {
  if (typeof v !== 'string' || v.trim() === '') throw invalid(where, `${field} must be a non-empty string, not ${describe(v)}`);
  return v.trim();
}

function parseKeep(v: unknown, where: string): KeepPolicy {
  if (!isObj(v)) throw invalid(where, `keep must be a mapping such as { last: 7, daily: 7 }, not ${describe(v)}`);
  assertKnownKeys(v, KEEP_KEYS, `${where}: keep`);
  const keep: KeepPolicy = {};
  for (const k of KEEP_KEYS) {
    const n = v[k];
    if (n === undefined || n === null) continue;
    if (typeof n !== 'number' || !Number.isInteger(n) || n < 0) throw invalid(where, `keep.${k} must be a whole number ≥ 0, not ${describe(n)}`);
    keep[k as keyof KeepPolicy] = n;
  }
  try {
    assertPolicy(keep);
  } catch (e) {
    throw invalid(where, `keep must keep something: give keep.last, keep.daily, keep.weekly or keep.monthly above 0`);
  }
  return keep;
}

function parseRepo(v: unknown, where: string, base: string): string {
  const repo = str(v, where, 'repo');
  if (/^[a-z][a-z0-9+.-]*:\/\//i.test(repo)) {
    if (!/^s3:\/\//i.test(repo)) throw invalid(where, `repo "${repo}": only s3://BUCKET/PREFIX or a local folder`);
    try {
      parseS3Url(repo);
    } catch (e) {
      throw invalid(where, `repo: ${(e as Error).message}`);
    }
    return repo;
  }
  return isAbsolute(repo) ? repo : resolve(base, repo);
}

function parseBitmap(v: unknown, where: string): string | null | undefined {
  if (v === undefined) return undefined;
  if (v === null || v === false) return null;
  const b = str(v, where, 'bitmap');
  const problem = backupBitmapNameProblem(b); // the backup engine's own rule
  if (problem) throw invalid(where, `bitmap "${b}" ${problem}`);
  return b;
}

function parseJob(v: unknown, i: number, top: { timezone: string; base: string; file: string }): ScheduleJob {
  const at = `${top.file}: jobs[${i}]`;
  if (!isObj(v)) throw invalid(at, `a job must be a mapping with name, images, repo and when, not ${describe(v)}`);
  if (typeof v.name !== 'string' || !/^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/.test(v.name)) {
    throw invalid(at, `name must be 1–64 characters of letters, digits, ".", "_" or "-" (starting with a letter or digit), not ${describe(v.name)}`);
  }
  const where = `${top.file}: job "${v.name}"`;
  assertKnownKeys(v, JOB_KEYS, where);
  const replicate = parseReplicate(v, where, top.base);
  for (const k of replicate ? ['images', 'when'] : ['images', 'repo', 'when']) if (v[k] === undefined) throw invalid(where, `missing field "${k}"`);
  const rawImages = typeof v.images === 'string' ? [v.images] : v.images;
  if (!Array.isArray(rawImages) || rawImages.length === 0) throw invalid(where, `images must be a non-empty list of paths or globs, not ${describe(v.images)}`);
  const images = rawImages.map((p, k) => {
    const s = str(p, where, `images[${k}]`);
    return isAbsolute(s) ? s : resolve(top.base, s);
  });
  let when: When;
  try {
    when = parseWhen(typeof v.when === 'string' ? v.when : '');
  } catch (e) {
    throw invalid(where, typeof v.when === 'string' ? (e as Error).message : `when must be a string such as "every 1 day at 02:00", not ${describe(v.when)}`);
  }
  const timezone = v.timezone === undefined ? top.timezone : checkZone(str(v.timezone, where, 'timezone'), `${where}: timezone`);
  if (replicate && (images.length !== 1 || /[*?[]/.test(images[0]!))) {
    throw invalid(where, `a replicate job copies one disk to one destination: images must be one path, not a list or a glob`);
  }
  const job: ScheduleJob = { name: v.name, images, repo: replicate ? replicate.to : parseRepo(v.repo, where, top.base), when, timezone, tags: [] };
  if (replicate) Object.assign(job, { replicate: replicate.to, target: replicate.target });
  const bitmap = parseBitmap(v.bitmap, where);
  if (bitmap !== undefined) job.bitmap = bitmap;
  if (v.keep !== undefined && v.keep !== null) job.keep = parseKeep(v.keep, where);
  if (v.rpo !== undefined && v.rpo !== null) {
    job.rpo = String(v.rpo);
    job.rpoMs = parseDuration(typeof v.rpo === 'string' ? v.rpo : '', `${where}: rpo`);
  }
  if (v.encrypt !== undefined) {
    if (typeof v.encrypt !== 'boolean') throw invalid(where, `encrypt must be true or false (whether a repository this job creates is encrypted), not ${describe(v.encrypt)}`);
    if (!v.encrypt) job.encrypt = false;
  }
  if (v.tags !== undefined) {
    if (!Array.isArray(v.tags)) throw invalid(where, `tags must be a list of strings, not ${describe(v.tags)}`);
    job.tags = v.tags.map((t, k) => str(t, where, `tags[${k}]`));
  }
  return job;
}

/** Validates a parsed schedule. `file` names it in errors; relative paths resolve against its folder. */
export function parseConfig(data: unknown, file: string, opts: { baseDir?: string } = {}): ScheduleConfig {
  if (!isObj(data)) throw invalid(file, `expected a mapping with "jobs", not ${describe(data)}`);
  assertKnownKeys(data, TOP_KEYS, file);
  const timezone = data.timezone === undefined ? systemZone() : checkZone(str(data.timezone, file, 'timezone'), `${file}: timezone`);
  let parallel = 1;
  if (data.parallel !== undefined) {
    const p = data.parallel;
    if (typeof p !== 'number' || !Number.isInteger(p) || p < 1 || p > MAX_PARALLEL) throw invalid(file, `parallel must be a whole number 1–${MAX_PARALLEL}, not ${describe(p)}`);
    parallel = p;
  }
  if (!Array.isArray(data.jobs) || data.jobs.length === 0) throw invalid(file, `jobs must be a non-empty list, not ${describe(data.jobs)}`);
  const top = { timezone, base: opts.baseDir ?? dirname(file), file };
  const jobs = data.jobs.map((j, i) => parseJob(j, i, top));
  const seen = new Set<string>();
  for (const j of jobs) {
    if (seen.has(j.name)) throw invalid(file, `two jobs are named "${j.name}"`);
    seen.add(j.name);
  }
  return { file, timezone, parallel, jobs };
}

/** Parses schedule text (YAML or JSON). */
export function parseConfigText(text: string, file: string, opts: { baseDir?: string } = {}): ScheduleConfig {
  return parseConfig(parseText(text, file), file, opts);
}

/** Reads and validates the schedule file at `path` (KSC_E_NOT_FOUND when missing, KSC_E_INVALID when wrong). */
export async function loadConfig(path: string): Promise<ScheduleConfig> {
  const file = resolve(path);
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (e) {
    throw ioError(file, 'reading the schedule', e);
  }
  return parseConfigText(text, file);
}
