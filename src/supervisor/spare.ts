/**
 * The spare worker of `kscinc serve` (issue 16, crash → serving < 1 s): a worker process started and warmed
 * up in advance, holding no image, so that after a crash the supervisor only has to tell it to open the
 * images. Starting a Node process and loading kscinc takes 0.5–1.5 s of CPU on a busy 2-core host, more
 * than everything else a crash restart does (bench/README "Crash → serving"). The spare is started a little
 * after a worker begins serving (not to compete with its first requests), replaced after a hot upgrade
 * (it runs the code that was installed when it started), and never used for an upgrade. A spare that dies is
 * not replaced until the next worker starts serving, so a build that cannot start does not loop.
 * KSCINC_SPARE_WORKER=0 turns it off.
 */
import { Child } from './child.js';

const LOAD_MS = 30_000;
const WARM_MS = 10_000;

export class Spare {
  private child: Child | null = null;
  private ready = false;
  private timer: NodeJS.Timeout | null = null;
  private readonly enabled = process.env.KSCINC_SPARE_WORKER !== '0';
  private closed = false;

  constructor(private readonly log: (line: string) => void) {}

  /** Starts a spare after `delayMs` unless one is there or coming. */
  refill(delayMs = 1000): void {
    if (!this.enabled || this.closed || this.child || this.timer) return;
    this.timer = setTimeout(() => {
      this.timer = null;
      void this.start();
    }, delayMs);
    this.timer.unref();
  }

  private async start(): Promise<void> {
    const c = new Child('spare');
    this.child = c;
    this.ready = false;
    void c.exited.then(() => {
      if (this.child === c) this.child = null;
    });
    try {
      const loaded = await c.next(['loaded'], LOAD_MS, 'starting');
      if (loaded.t === 'loaded') c.version = loaded.version;
      const warmed = c.next(['warmed'], WARM_MS, 'warming up');
      c.send({ t: 'warm' });
      await warmed;
      if (this.child === c) this.ready = true;
    } catch (e) {
      this.log(`kscinc serve: the spare worker failed: ${(e as Error).message}`);
      if (this.child === c) this.child = null;
      await c.kill();
    }
  }

  /** The spare, if it is loaded and warmed up and alive, taken out (the caller opens the images in it). */
  take(): Child | null {
    const c = this.child;
    if (!c || !this.ready || !c.alive || !c.proc.connected) return null;
    this.child = null;
    this.ready = false;
    return c;
  }

  /** Kills the spare (after an upgrade: it runs the code of before); `forever`: the supervisor stops. */
  async drop(forever = false): Promise<void> {
    this.closed ||= forever;
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    const c = this.child;
    this.child = null;
    this.ready = false;
    if (c) await c.kill();
  }
}
