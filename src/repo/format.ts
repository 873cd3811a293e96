// re-export for src/engines/backup.ts, src/engines/backup/** and src/engines/prune.ts; remove after merge.
// The repository objects' codecs live one object a file: constants.ts (every magic number and size),
// config.ts, pack.ts, index-object.ts, manifest.ts.
export * from './constants.js';
export * from './config.js';
export { type PackEntry, packHeader, checkPackHeader, packFooter, decodePackTail, decodePackEntries } from './pack.js';
export * from './index-object.js';
export * from './manifest.js';
