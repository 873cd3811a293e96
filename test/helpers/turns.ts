/**
 * Runs `loop` beside a chain of setImmediates; returns how many turns the chain got meanwhile. `onTurn`
 * hears the count at each turn (for a loop that notes, step by step, whether a turn came in between).
 */
export async function turnsDuring(loop: () => Promise<void>, onTurn?: (turns: number) => void): Promise<number> {
  await new Promise((resolve) => setImmediate(resolve));
  let turns = 0;
  let stop = false;
  const tick = (): void => {
    if (stop) return;
    turns++;
    onTurn?.(turns);
    setImmediate(tick);
  };
  setImmediate(tick);
  try {
    await loop();
  } finally {
    stop = true;
  }
  return turns;
}

/**
 * Counts events (`count()`) between turns of a chain of setImmediates started at construction, until
 * `stop()`: `longest` is the most events counted between two turns (the run since the last turn included),
 * `turns` the turns the chain got.
 */
export class RunsBetweenTurns {
  turns = 0;
  private run = 0;
  private most = 0;
  private stopped = false;

  constructor() {
    setImmediate(this.tick);
  }

  count(): void {
    this.run++;
  }

  get longest(): number {
    return Math.max(this.most, this.run);
  }

  stop(): void {
    this.stopped = true;
  }

  private readonly tick = (): void => {
    if (this.stopped) return;
    this.most = Math.max(this.most, this.run);
    this.run = 0;
    this.turns++;
    setImmediate(this.tick);
  };
}
