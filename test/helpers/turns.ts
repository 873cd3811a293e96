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
