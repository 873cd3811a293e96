/** Runs `loop` beside a chain of setImmediates; returns how many turns the chain got meanwhile. */
export async function turnsDuring(loop: () => Promise<void>): Promise<number> {
  await new Promise((resolve) => setImmediate(resolve));
  let turns = 0;
  let stop = false;
  const tick = (): void => {
    if (stop) return;
    turns++;
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
