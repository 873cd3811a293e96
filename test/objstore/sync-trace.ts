/**
 * What a power cut or a kill at any moment leaves of a folder repository, judged from the system calls a
 * real writer made (strace -ff of a `kscinc backup` child), not from the writer's own account of them.
 *
 * The model (ext4 and any POSIX file system give no more than this): a name created or renamed into a
 * folder survives a power cut for certain only once an fsync of that folder STARTED after the rename (or
 * mkdir) completed, and has completed; every folder on the way to it the same way (folders that existed
 * before the trace are durable). A name whose rename was merely issued MAY survive. A file's bytes are
 * durable once an fsync of it started after its last write and completed; a name that may survive with
 * bytes not yet durable is a torn object. A kill is the weaker case: what completed stays, in the page
 * cache; every name that may survive a power cut includes every name a kill leaves.
 *
 * `checkCommitOrder` walks every step (each system call's start and end) and checks the rules of
 * formats/repository.md §9 the commit relies on:
 *  - rule 1: an index object that may exist names only packs that are durable;
 *  - rule 2: a manifest that may exist lists only chunks (other than the zero id) named by a durable index
 *    object (whose packs are durable by rule 1);
 *  - every object (pack, index object, manifest, config) was durable in its bytes before its rename was
 *    issued (else a cut may show it torn);
 *  - rule 3, as the user sees it: when the writer reports success (its first write to stdout), the
 *    manifest it reports is durable.
 */
import { readdirSync, readFileSync } from 'node:fs';
import { dirname, join, relative } from 'node:path';

/** One system call of the trace: start and end in µs since the epoch, the call and its raw arguments. */
export interface Call {
  tid: number;
  start: number;
  end: number;
  name: string;
  args: string;
  ret: string;
}

/** Parses the files `prefix`.TID written by `strace -ff -ttt -T -y -s 4096 -o prefix`. */
export function readTrace(prefix: string): Call[] {
  const dir = dirname(prefix);
  const base = prefix.slice(dir.length + 1);
  const calls: Call[] = [];
  for (const f of readdirSync(dir)) {
    if (!f.startsWith(`${base}.`)) continue;
    const tid = Number(f.slice(base.length + 1));
    for (const line of readFileSync(join(dir, f), 'utf8').split('\n')) {
      const m = /^(\d+\.\d+) (\w+)\((.*)\) += (.*?) <(\d+\.\d+)>$/.exec(line);
      if (!m) continue;
      const start = Math.round(Number(m[1]) * 1e6);
      calls.push({ tid, start, end: start + Math.round(Number(m[5]) * 1e6), name: m[2]!, args: m[3]!, ret: m[4]! });
    }
  }
  return calls.sort((a, b) => a.start - b.start || a.end - b.end);
}

/** The path strace -y shows for the call's first argument (a descriptor), or null. */
function fdPath(args: string): string | null {
  const m = /^-?\d+<([^>]*)>/.exec(args);
  return m ? m[1]! : null;
}

/** The quoted string arguments of a call (paths). */
function quoted(args: string): string[] {
  return [...args.matchAll(/"((?:[^"\\]|\\.)*)"/g)].map((m) => m[1]!);
}

interface Span {
  start: number;
  end: number;
}

/** The durability facts of one repository folder `root`, from a trace. */
export class RepoTrace {
  /** Final key → the rename that gave it its name (the last one) and the part file renamed. */
  readonly renames = new Map<string, Span & { part: string }>();
  /** Folder (absolute) → its mkdir. */
  readonly mkdirs = new Map<string, Span>();
  /** Path (absolute: a part, a folder, or a final name) → fsyncs of it. */
  readonly syncs = new Map<string, Span[]>();
  /** Part file → the end of its last write. */
  readonly lastWrite = new Map<string, number>();
  /** The first write to stdout (the result), if any. */
  readonly reported: number | null;
  /** Every moment to judge: each call's start and end. */
  readonly steps: number[];

  constructor(
    readonly root: string,
    calls: Call[],
  ) {
    let reported: number | null = null;
    const steps = new Set<number>();
    for (const c of calls) {
      if (c.ret.startsWith('-1')) continue;
      steps.add(c.start).add(c.end);
      const fd = fdPath(c.args);
      if (/^(f|fdata)sync$/.test(c.name) && fd) {
        const list = this.syncs.get(fd) ?? [];
        list.push({ start: c.start, end: c.end });
        this.syncs.set(fd, list);
      } else if (/^p?writev?(64)?$/.test(c.name)) {
        if (fd && fd.startsWith(join(root, '.tmp/'))) this.lastWrite.set(fd, Math.max(this.lastWrite.get(fd) ?? 0, c.end));
        if (/^1(<|$)/.test(c.args) && reported === null) reported = c.start;
      } else if (/^rename(at2?)?$/.test(c.name)) {
        const [from, to] = quoted(c.args);
        if (from && to && to.startsWith(root + '/')) this.renames.set(relative(root, to), { start: c.start, end: c.end, part: from });
      } else if (/^mkdir(at)?$/.test(c.name)) {
        const [p] = quoted(c.args);
        if (p && p.startsWith(root + '/')) this.mkdirs.set(p.replace(/\/+$/, ''), { start: c.start, end: c.end });
      }
    }
    this.reported = reported;
    this.steps = [...steps].sort((a, b) => a - b);
  }

  /** An fsync of `path` that started after `after` and completed by `t`. */
  private syncedBetween(path: string, after: number, t: number): boolean {
    return (this.syncs.get(path) ?? []).some((s) => s.start > after && s.end <= t);
  }

  /** The folder's own name is durable at `t` (it existed before the trace, or its mkdir is synced in its parent). */
  private folderDurable(folder: string, t: number): boolean {
    if (folder === this.root) return true;
    const made = this.mkdirs.get(folder);
    if (made && !(made.end <= t && this.syncedBetween(dirname(folder), made.end, t))) return false;
    return this.folderDurable(dirname(folder), t);
  }

  /** Object `key` may exist after a cut at `t` (its rename was issued). */
  mayExist(key: string, t: number): boolean {
    const r = this.renames.get(key);
    return r !== undefined && r.start < t;
  }

  /** Object `key` is durable at `t`: its bytes before its rename, its name, and every folder on the way. */
  durable(key: string, t: number): boolean {
    const r = this.renames.get(key);
    if (!r || r.end > t) return false;
    const path = join(this.root, key);
    return this.bytesDurableBeforeRename(key) && this.syncedBetween(dirname(path), r.end, t) && this.folderDurable(dirname(path), t);
  }

  /** The part's bytes were durable before the rename that named it was issued. */
  bytesDurableBeforeRename(key: string): boolean {
    const r = this.renames.get(key);
    if (!r) return false;
    const written = this.lastWrite.get(r.part) ?? 0;
    return (this.syncs.get(r.part) ?? []).some((s) => s.start >= written && s.end <= r.start);
  }
}

/** What the objects of the repository hold (read after the run). */
export interface RepoContents {
  /** Index object key → the pack ids it names and the chunk ids (hex) it names. */
  index: Map<string, { packs: Set<string>; ids: Set<string> }>;
  /** Manifest key → the non-zero chunk ids it lists (hex). */
  manifests: Map<string, Set<string>>;
}

export const packKeyOf = (id: string): string => `packs/${id.slice(0, 2)}/${id}.pack`;

/**
 * The violations of the rules above at any step of `trace` (empty: none), for the objects in `contents`
 * whose renames the trace holds; `steps` counts the moments judged.
 */
export function checkCommitOrder(trace: RepoTrace, contents: RepoContents, expectManifest: string | null): { violations: string[]; steps: number } {
  const out = new Set<string>();
  const keys = [...trace.renames.keys()].filter((k) => /^(packs\/|index\/|manifests\/|config$)/.test(k));
  for (const k of keys) if (!trace.bytesDurableBeforeRename(k)) out.add(`${k}: renamed before its bytes were durable (a cut may leave it torn)`);
  const indexKeys = keys.filter((k) => k.startsWith('index/'));
  const manifestKeys = keys.filter((k) => k.startsWith('manifests/'));
  for (const t of trace.steps) {
    for (const k of indexKeys) {
      if (!trace.mayExist(k, t)) continue;
      for (const p of contents.index.get(k)?.packs ?? []) {
        if (!trace.durable(packKeyOf(p), t) && trace.renames.has(packKeyOf(p))) out.add(`rule 1: ${k} may exist while the pack ${p} it names is not durable`);
      }
    }
    for (const k of manifestKeys) {
      if (!trace.mayExist(k, t)) continue;
      const named = new Set<string>();
      for (const [ik, v] of contents.index) if (!trace.renames.has(ik) || trace.durable(ik, t)) for (const id of v.ids) named.add(id);
      let missing = 0;
      for (const id of contents.manifests.get(k) ?? []) if (!named.has(id)) missing++;
      if (missing > 0) out.add(`rule 2: ${k} may exist while ${missing} of its chunks are named by no durable index object`);
    }
  }
  if (expectManifest !== null) {
    if (trace.reported === null) out.add('the writer never reported its result');
    else if (!trace.durable(expectManifest, trace.reported)) out.add(`rule 3: success was reported before ${expectManifest} was durable`);
  }
  return { violations: [...out], steps: trace.steps.length };
}
