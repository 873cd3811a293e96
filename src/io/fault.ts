/**
 * Deterministic fault injection, for crash tests (formats/ksc_inc.md §9, formats/repository.md §9: "prove
 * it with a test that kills at every step").
 *
 * A *step* is one mutating call of this process on durable state: on a writable HostFile, write, writev,
 * writeDurable, writeWithCrcs, punchHole, truncate or sync; on an object store, a durable put or delete
 * (objstore/fault.ts, withStoreFaults); and the naming steps of files built under a temporary name (link,
 * rename, unlink; io/newfile.ts) or replaced whole (faultStep around them). One counter numbers them from 1
 * in the order they are issued, across every file and store the process opens. With a plan `{ after: N }`,
 * steps 1 … N run normally; when step N + 1 is requested, the layer first waits for steps already in
 * flight to settle (so exactly steps 1 … N have reached the page cache or the store), then:
 *  - `kill`: SIGKILLs its own process (a real crash: what the kernel holds survives, nothing more runs);
 *  - `throw`: fails that step and every later one with KSC_E_IO (the caller abandons its objects; the
 *    file's state is what a SIGKILL at that point leaves).
 * Reads, size, lock and close are never faulted, so an abandoned image can still release its lock; nor are a
 * store's non-durable writes (lock leases, §8: their loss is harmless by design).
 *
 * From the environment (for child processes, read once at first use):
 *   KSC_FAULT_AFTER=N          kill after step N (KSC_FAULT_ACTION=throw to throw instead)
 *   KSC_FAULT_COUNT_FILE=PATH  write the number of steps taken to PATH when the process exits
 * Without these variables and without setFaultPlan() the layer is not installed at all.
 */
import { writeFileSync } from 'node:fs';
import { KscError } from '../errors.js';
import type { HostFile } from './file.js';

export interface FaultPlan {
  /** Steps allowed to run; Infinity only counts. */
  after: number;
  action: 'kill' | 'throw';
}

interface FaultState extends FaultPlan {
  steps: number;
  fired: boolean;
  inFlight: Set<Promise<unknown>>;
}

let state: FaultState | null = null;
let envRead = false;

/** Installs (or removes, with null) a plan for files opened from now on; resets the step count. */
export function setFaultPlan(plan: FaultPlan | null): void {
  envRead = true;
  state = plan ? { ...plan, steps: 0, fired: false, inFlight: new Set() } : null;
}

/** Steps counted since the plan was installed (0 without a plan). */
export function faultSteps(): number {
  return state?.steps ?? 0;
}

/** Whether the plan's fault has fired. */
export function faultFired(): boolean {
  return state?.fired ?? false;
}

function planFromEnv(): void {
  envRead = true;
  const after = process.env.KSC_FAULT_AFTER;
  const countFile = process.env.KSC_FAULT_COUNT_FILE;
  if (after === undefined && countFile === undefined) return;
  const n = after === undefined ? Infinity : Number(after);
  if (!(n >= 0)) throw new KscError('KSC_E_INVALID', `KSC_FAULT_AFTER=${after}: not a step count`);
  setFaultPlan({ after: n, action: process.env.KSC_FAULT_ACTION === 'throw' ? 'throw' : 'kill' });
  if (countFile) process.on('exit', () => writeFileSync(countFile, `${state?.steps ?? 0}\n`));
}

/** A step function bound to the plan installed now, or null when there is none. */
export type StepGate = <T>(what: string, run: () => Promise<T>) => Promise<T>;

/**
 * The step gate of the current plan (read from the environment at first use), or null without a plan.
 * Wrappers (a host file, a store) take it when they are made, like the plan a file opened under.
 */
export function faultGate(): StepGate | null {
  if (!envRead) planFromEnv();
  const s = state;
  return s ? (what, run) => runStep(s, what, run) : null;
}

/** Runs `run` as one step of the current plan (just runs it without one). `what` names the file or object. */
export function faultStep<T>(what: string, run: () => Promise<T>): Promise<T> {
  const gate = faultGate();
  return gate ? gate(what, run) : run();
}

async function runStep<T>(s: FaultState, what: string, run: () => Promise<T>): Promise<T> {
  if (!s.fired && s.steps >= s.after) {
    s.fired = true;
    await Promise.allSettled([...s.inFlight]);
    if (s.action === 'kill') {
      process.kill(process.pid, 'SIGKILL');
      await new Promise(() => undefined); // never resumes: the signal is on its way
    }
  }
  if (s.fired) throw new KscError('KSC_E_IO', `${what}: injected fault after step ${s.after}`);
  s.steps++;
  const p = run();
  s.inFlight.add(p);
  try {
    return await p;
  } finally {
    s.inFlight.delete(p);
  }
}

/** Wraps a writable host file in the fault layer when a plan is installed; otherwise returns it as is. */
export function withFaults(file: HostFile): HostFile {
  const gate = faultGate();
  return gate && file.writable ? new FaultHostFile(file, gate) : file;
}

class FaultHostFile implements HostFile {
  writeDurable?: HostFile['writeDurable'];
  writeWithCrcs?: HostFile['writeWithCrcs'];
  stamp?: HostFile['stamp'];
  /** Reads are never faulted: a zero-copy reply may read the descriptor directly. */
  readFd?: HostFile['readFd'];

  constructor(
    private readonly inner: HostFile,
    private readonly gate: StepGate,
  ) {
    if (inner.writeDurable) this.writeDurable = (buf, pos) => this.step(`durable write at ${pos}`, () => inner.writeDurable!(buf, pos));
    if (inner.writeWithCrcs) this.writeWithCrcs = (buf, pos, bs, lo, hi) => this.step(`write at ${pos}`, () => inner.writeWithCrcs!(buf, pos, bs, lo, hi));
    if (inner.stamp) this.stamp = () => inner.stamp!();
    if (inner.readFd) this.readFd = () => inner.readFd!();
  }

  get path(): string {
    return this.inner.path;
  }

  get writable(): boolean {
    return this.inner.writable;
  }

  private step<T>(what: string, run: () => Promise<T>): Promise<T> {
    return this.gate(`${this.inner.path}: ${what}`, run);
  }

  read(buf: Buffer, position: number): Promise<number> {
    return this.inner.read(buf, position);
  }

  write(buf: Buffer, position: number): Promise<void> {
    return this.step(`write at ${position}`, () => this.inner.write(buf, position));
  }

  writev(bufs: Buffer[], position: number): Promise<void> {
    return this.step(`write at ${position}`, () => this.inner.writev(bufs, position));
  }

  sync(): Promise<void> {
    return this.step('sync', () => this.inner.sync());
  }

  size(): Promise<number> {
    return this.inner.size();
  }

  allocatedBytes(): Promise<number> {
    return this.inner.allocatedBytes();
  }

  truncate(length: number): Promise<void> {
    return this.step(`truncate to ${length}`, () => this.inner.truncate(length));
  }

  punchHole(offset: number, length: number): Promise<boolean> {
    return this.step(`punch hole at ${offset}`, () => this.inner.punchHole(offset, length));
  }

  seekData(offset: number): number | null {
    return this.inner.seekData(offset);
  }

  seekHole(offset: number): number | null {
    return this.inner.seekHole(offset);
  }

  lockExclusive(): Promise<void> {
    return this.inner.lockExclusive();
  }

  close(): Promise<void> {
    return this.inner.close();
  }
}
