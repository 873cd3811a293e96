// re-export for src/image/ksc.ts (and src/image/ksc/**); remove after merge: the primitives live in concurrency.ts.
export { Mutex, RangeLock } from './concurrency.js';
