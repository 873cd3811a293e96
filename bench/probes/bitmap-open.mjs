// Fresh process: open the ksc_inc image read-only, list bitmap "backup"'s dirty extents (loads its pages), close.
// Usage: node --single-threaded bench/probes/bitmap-open.mjs DIST IMAGE (the image has a bitmap "backup"),
// under callgrind (bench/README.md, session 21).
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
const { openKsc } = await import(pathToFileURL(join(process.argv[2], 'image/open.js')).href);
const img = await openKsc(process.argv[3], { write: false });
const ext = await img.bitmapExtents('backup');
if (process.env.SHOW) console.log(ext.length, 'extents');
await img.close();
