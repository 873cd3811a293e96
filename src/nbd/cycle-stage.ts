/**
 * The destination's side of atomic replication cycles (formats/migrate.md §11.7): one CycleStage per
 * `--incoming` export, in the serving process, holding the open cycle log if any. The source's connections
 * are tagged with their cycle (`kscinc:incoming-cycle=TOKEN:CYCLE`); while a cycle is open (after
 * `kscinc:incoming-begin=TOKEN:CYCLE`), the writes of the connections tagged with it go to the log, every
 * other write fails (EPERM), and reads see the image: the last consistent point. Without an open cycle the
 * source writes the image directly (a first pass, or a source that stages nothing: today's behaviour).
 */
import { KscError } from '../errors.js';
import type { BlockDevice, WriteOptions, ZeroOptions } from '../image/types.js';
import { CycleLog, KIND, settleLog } from './cycle-log.js';
import { NbdRequestError } from './errors.js';
import { ERR } from './wire.js';

/** How many cycles that are over this process remembers, to refuse their connections' late writes. */
const OVER_KEPT = 256;

export class CycleStage {
  private log: CycleLog | null = null;
  /** Cycles begun here that are over (discarded or committed), oldest first: their connections may not write. */
  private readonly over = new Set<string>();
  private loaded: Promise<void> | null = null;
  /** Begin and commit, one at a time. */
  private chain: Promise<unknown> = Promise.resolve();

  constructor(
    private readonly image: string,
    private readonly dev: BlockDevice,
    private readonly say: (line: string) => void,
  ) {}

  /** The open cycle, loaded once per process (a worker after an upgrade reopens the log; a committed one is finished). */
  async current(): Promise<CycleLog | null> {
    this.loaded ??= (async () => {
      this.log = await CycleLog.reopen(this.image, this.dev);
      if (!this.log) {
        const done = await settleLog(this.image, this.dev);
        if (done) this.say(`kscinc serve: replication cycle log of ${this.image} ${done} (a restart part way)`);
      }
    })();
    await this.loaded;
    return this.log;
  }

  private serial<T>(run: () => Promise<T>): Promise<T> {
    const p = this.chain.then(run);
    this.chain = p.catch(() => undefined);
    return p;
  }

  /** Begins `cycle`: an open cycle that is not committed is discarded first; the new log is durable when it resolves. */
  begin(cycle: string): Promise<void> {
    return this.serial(async () => {
      const old = await this.current();
      if (old?.cycle === cycle) return;
      this.log = null;
      if (old) {
        this.ended(old.cycle);
        await old.discard();
        this.say(`kscinc serve: replication cycle ${old.cycle} of ${this.image} discarded (never committed)`);
      }
      this.log = await CycleLog.create(this.image, cycle, this.dev);
    });
  }

  /** Commits `cycle` (durably), applies it to the image and removes the log; false when it is not the open cycle. */
  commit(cycle: string): Promise<boolean> {
    return this.serial(async () => {
      const log = await this.current();
      if (log?.cycle !== cycle || log.isBroken) return false; // a broken log lost a change: never committed
      this.log = null;
      this.ended(cycle);
      try {
        await log.commit(this.dev);
      } catch (e) {
        // Past the commit point the log may be left committed but not (wholly) applied: the next use settles
        // it again (applies it, or fails again) before any write or begin reaches the image (§11.7 rule 6).
        this.loaded = null;
        throw e;
      }
      this.say(`kscinc serve: replication cycle ${cycle} of ${this.image} committed and applied`);
      return true;
    });
  }

  private ended(cycle: string): void {
    this.over.add(cycle);
    if (this.over.size > OVER_KEPT) this.over.delete(this.over.values().next().value!);
  }

  /**
   * Where a write of a connection tagged `tag` (null: untagged) goes: the log, the image (null), or refused.
   * A connection of a cycle that is over (a late write of a cycle discarded or committed) is refused even
   * when no cycle is open: it would change the image, the last consistent point, outside any cycle.
   */
  async route(tag: string | null): Promise<CycleLog | null> {
    const log = await this.current();
    if (!log && tag !== null && this.over.has(tag)) throw new NbdRequestError(ERR.EPERM, `replication cycle ${tag} is over on this export: its connections may not write`);
    if (!log) return null;
    if (log.cycle === tag) return log;
    throw new NbdRequestError(ERR.EPERM, `replication cycle ${log.cycle} is open on this export: a write of ${tag ? `cycle ${tag}` : 'no cycle'} is refused`);
  }

  async close(): Promise<void> {
    await this.chain;
    await this.log?.close();
    this.log = null;
  }
}

/** The image as the source's connection tagged `tag` sees it: reads from the image, writes routed by the stage. */
export function stagedDevice(dev: BlockDevice, stage: CycleStage, tag: string | null): BlockDevice {
  const view: BlockDevice = {
    name: dev.name,
    format: dev.format,
    size: dev.size,
    blockSize: dev.blockSize,
    readOnly: dev.readOnly,
    read: (o, n) => dev.read(o, n),
    readInto: (o, t) => dev.readInto(o, t),
    extents: (o, n) => dev.extents(o, n),
    close: () => Promise.reject(new KscError('KSC_E_INVALID', 'a staged view is not closed')),
    async write(o: number, data: Buffer, opts?: WriteOptions) {
      const log = await stage.route(tag);
      if (log) await log.append(KIND.WRITE, o, data.length, data, !!opts?.fua);
      else await dev.write(o, data, opts);
    },
    async writeZeroes(o: number, n: number, opts?: ZeroOptions) {
      const log = await stage.route(tag);
      if (log) await log.append(opts?.mayTrim === false ? KIND.ZERO : KIND.ZERO_MAY_TRIM, o, n, null, !!opts?.fua);
      else await dev.writeZeroes(o, n, opts);
    },
    async discard(o: number, n: number, opts?: WriteOptions) {
      const log = await stage.route(tag);
      if (log) await log.append(KIND.DISCARD, o, n, null, !!opts?.fua);
      else await dev.discard(o, n, opts);
    },
    async flush() {
      const log = await stage.current();
      if (log?.cycle === tag) await log.sync();
      await dev.flush();
    },
  };
  return view;
}
