/**
 * mulberry32: a small seeded PRNG returning floats in [0, 1). Not for anything secret; it lets tests,
 * their child processes and the benchmarks reproduce the same offsets from a printed seed. Plain
 * JavaScript so that child processes and bench/ (which run without TypeScript) share it with the tests.
 * @param {number} seed
 * @returns {() => number}
 */
export function mulberry32(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
