/**
 * A byte-rate limit (a token bucket kept as a virtual clock): `take(n)` resolves when `n` more bytes fit
 * within `rate` bytes per second since the limiter was last idle, allowing a burst of `burst` bytes. Callers
 * are served in call order. Used by the server's background pull (`kscinc serve --bandwidth`).
 */
export class RateLimit {
  /** When the bytes granted so far will have been "sent" at the rate (ms, performance.now()). */
  private due = 0;

  constructor(
    readonly rate: number,
    private readonly burst = rate / 4,
  ) {
    if (!(rate > 0)) throw new RangeError(`rate ${rate}: expected bytes per second > 0`);
  }

  /** Waits until `n` bytes may go; `stopped` is polled so a long wait can end early (then it resolves at once). */
  async take(n: number, stopped: () => boolean = () => false): Promise<void> {
    const now = performance.now();
    this.due = Math.max(this.due, now) + (n / this.rate) * 1000;
    let wait = this.due - now - (this.burst / this.rate) * 1000;
    while (wait > 0 && !stopped()) {
      await new Promise((r) => setTimeout(r, Math.min(wait, 200)));
      wait = this.due - performance.now() - (this.burst / this.rate) * 1000;
    }
  }
}
