/** create, info, map, check, convert, snapshot, commit, rebase. */
import type { Command } from 'commander';
import { KscError, isKscError } from '../errors.js';
import { EXIT } from './exit.js';
import { checkImage } from '../engines/check.js';
import { convertImage } from '../engines/convert.js';
import { commitImage, rebaseImage, snapshotImage } from '../engines/ops.js';
import { createImage, openImage, probeFormat, type ImageFormat } from '../image/open.js';
import { parseSize } from '../util/size.js';
import { isInternalBitmap } from './bitmap-commands.js';
import { formatName, formatSize, parseFormat, printJson, println, progressBar } from './output.js';

export { parseFormat, formatName };

/**
 * Test hook: KSCINC_TEST_CONVERT_DELAY_MS paces convert (one chunk at a time, this long before each), so a
 * test can interrupt it half-way with a real signal. Unset, convert runs at full speed.
 */
function testPacing(): { inFlight?: number; beforeChunk?: () => Promise<void> } {
  const ms = Number(process.env.KSCINC_TEST_CONVERT_DELAY_MS ?? 0);
  if (!(ms > 0)) return {};
  return { inFlight: 1, beforeChunk: () => new Promise((r) => setTimeout(r, ms)) };
}

/** check on a file that is not ksc_inc: one line and its own exit status (63, as qemu-img check). */
async function refuseNonKsc(image: string): Promise<void> {
  let what: string;
  try {
    if ((await probeFormat(image)) === 'ksc_inc') return;
    what = `${image}: is not a ksc_inc image (raw data): nothing to check`;
  } catch (e) {
    if (!isKscError(e, 'KSC_E_FORMAT')) throw e;
    what = e.message;
  }
  throw Object.assign(new KscError('KSC_E_FORMAT', what), { exitCode: EXIT.NOT_KSC });
}

/**
 * image/describe.js on first use: it reaches a live restore's backing and the repository code under it, which
 * convert, check and the other commands of this group never need (CLI start-up, bench/README.md session 16).
 */
async function describeImage(image: string): Promise<Awaited<ReturnType<typeof import('../image/describe.js').describeImage>>> {
  return (await import('../image/describe.js')).describeImage(image);
}

const sizeArg =
  (what: string) =>
  (v: string): number =>
    parseSize(v, what);

export function registerImageCommands(program: Command): void {
  registerCreate(program);
  registerInfo(program);
  registerMap(program);
  registerCheck(program);
  registerConvert(program);
  registerSnapshot(program);
  registerCommit(program);
  registerRebase(program);
}

/** kscinc create: create a ksc_inc image, optionally as an overlay on a backing image. */
function registerCreate(program: Command): void {
  program
    .command('create')
    .description('create a ksc_inc image, optionally as an overlay on a backing image')
    .argument('<image>', 'new image file')
    .option('--size <size>', 'virtual size (K/M/G/T); default: the backing image size', sizeArg('--size'))
    .option('--backing <file>', 'backing image (raw or ksc_inc), stored relative to the new image')
    .option('--backing-format <fmt>', 'raw or kscinc (default: detected)', parseFormat)
    .option('--block-size <size>', 'block size, a power of two from 4K to 2M', sizeArg('--block-size'), 65536)
    .option('--force', 'replace an existing file')
    .option('--json', 'print the result as JSON')
    .action(async (image: string, o: { size?: number; backing?: string; backingFormat?: ImageFormat; blockSize: number; force?: boolean; json?: boolean }) => {
      await createImage(image, { size: o.size, backing: o.backing, backingFormat: o.backingFormat, blockSize: o.blockSize, force: o.force });
      const info = await describeImage(image);
      if (o.json) printJson(info);
      else println(`created ${image}: ${formatSize(info.virtualSize)}, block size ${formatSize(info.blockSize)}${o.backing ? `, backing ${o.backing}` : ''}`);
    });
}

/** kscinc info: show an image: format, sizes, disk UUID, backing chain, bitmaps. */
function registerInfo(program: Command): void {
  program
    .command('info')
    .description('show an image: format, sizes, disk UUID, backing chain, bitmaps')
    .argument('<image>')
    .option('--all', 'also list the internal bitmaps backups keep (NAME#TOKEN, NAME~frozen)')
    .option('--json', 'print JSON')
    .action(async (image: string, o: { all?: boolean; json?: boolean }) => {
      const info = await describeImage(image);
      if (o.json) return printJson(o.all ? info : { ...info, bitmaps: info.bitmaps.filter((b) => !isInternalBitmap(b.name)) });
      println(`image: ${info.file}`);
      println(`format: ${info.format}`);
      println(`virtual size: ${formatSize(info.virtualSize)} (${info.virtualSize} bytes)`);
      println(`disk size: ${formatSize(info.allocatedBytes)}`);
      if (info.format === 'ksc_inc') {
        println(`block size: ${formatSize(info.blockSize)}`);
        println(`disk uuid: ${info.diskUuid}`);
        println(`clean: ${info.dirty ? 'no (not closed cleanly, or open for writing)' : 'yes'}`);
        if (info.migratedAway) println('migrated away: yes (a stale copy: the disk moved to another host; serve and write refuse it without --force)');
        if (info.backingChain.length > 0) println(`backing chain: ${info.backingChain.map((b) => `${b.file} (${b.format})`).join(' -> ')}`);
        if (info.backingError) println(`live restore: its repository cannot be opened from here (${info.backingError}); how much is local is unknown`);
        const l = info.liveRestore;
        if (l) {
          const pct = l.totalBytes > 0 ? ((100 * l.localBytes) / l.totalBytes).toFixed(1) : '100.0';
          println(
            `live restore: backup ${l.backup}: ${formatSize(l.localBytes)} of ${formatSize(l.totalBytes)} local (${pct} %), ${l.localChunks}/${l.totalChunks} chunks; the rest is read from the repository`,
          );
        }
        const og = info.origin;
        if (og)
          println(
            'problem' in og
              ? `origin: none trusted (${og.problem})`
              : `origin: backup ${og.backup} of disk ${og.disk} in repository ${og.repository} (${og.location || 'location not recorded'}); changes since in bitmap ${og.bitmap}`,
          );
        const shown = o.all ? info.bitmaps : info.bitmaps.filter((b) => !isInternalBitmap(b.name));
        if (shown.length > 0) {
          println('bitmaps:');
          for (const b of shown) {
            println(
              `  ${b.name}: granularity ${formatSize(b.granularity)}, ${b.enabled ? 'enabled' : 'disabled'}, dirty ${formatSize(b.dirtyBytes)}${b.consistent ? '' : ' (inconsistent)'}${b.damage ? ` (damaged: ${b.damage})` : ''}${isInternalBitmap(b.name) ? ' (internal)' : ''}`,
            );
          }
        }
        const hidden = info.bitmaps.length - shown.length;
        if (hidden > 0) println(`(${hidden} internal bitmap${hidden === 1 ? '' : 's'} of backups not shown: --all)`);
      }
    });
}

/** kscinc map: list extents: offset, length, data|zero|unallocated, and the chain depth that holds them. */
function registerMap(program: Command): void {
  program
    .command('map')
    .description('list extents: offset, length, data|zero|unallocated, and the chain depth that holds them')
    .argument('<image>')
    .option('--json', 'print JSON')
    .action(async (image: string, o: { json?: boolean }) => {
      const dev = await openImage(image);
      try {
        const extents = await dev.extents(0, dev.size);
        if (o.json) return printJson(extents);
        println(`${'offset'.padEnd(18)}${'length'.padEnd(18)}${'state'.padEnd(13)}depth`);
        for (const e of extents) {
          println(`${('0x' + e.offset.toString(16)).padEnd(18)}${('0x' + e.length.toString(16)).padEnd(18)}${e.state.padEnd(13)}${e.depth ?? '-'}`);
        }
      } finally {
        await dev.close();
      }
    });
}

/** kscinc check: check metadata consistency; --verify also checks data against checksums. */
function registerCheck(program: Command): void {
  program
    .command('check')
    .description('check metadata consistency; --verify also checks data against checksums')
    .argument('<image>')
    .option('--verify', 'read every block that has a checksum and compare')
    .option('--repair', 'reclaim leaked space and finish crash recovery')
    .option('--json', 'print JSON')
    .action(async (image: string, o: { verify?: boolean; repair?: boolean; json?: boolean }) => {
      await refuseNonKsc(image);
      const bar = progressBar('verify', 'blocks');
      const r = await checkImage(image, { verify: o.verify, repair: o.repair, onProgress: bar.update }).finally(bar.stop);
      if (o.json) printJson(r);
      else {
        for (const e of r.errors) println(`ERROR: ${e}`);
        for (const w of r.warnings) println(`warning: ${w}`);
        for (const x of r.repaired) println(`repaired: ${x}`);
        println(`${r.dataBlocks} data blocks, ${r.zeroBlocks} zero blocks${r.dirty ? ', not closed cleanly' : ''}`);
        if (r.verify) println(`verified ${r.verify.checked} blocks: ${r.verify.mismatches.length} mismatches, ${r.verify.withoutChecksum} without checksum`);
        println(r.ok ? 'No errors were found on the image.' : `${r.errors.length} errors were found on the image.`);
      }
      // Like qemu-img check: 2 = corruption, 3 = leaks only.
      process.exitCode = !r.ok ? EXIT.CORRUPT : r.leakedBytes > 0 && !o.repair ? EXIT.LEAKS_OR_DAMAGE : EXIT.OK;
    });
}

/** kscinc convert: copy any image or chain into a new raw or ksc_inc image (zero blocks skipped). */
function registerConvert(program: Command): void {
  program
    .command('convert')
    .description('copy any image or chain into a new raw or ksc_inc image (zero blocks skipped)')
    .argument('<src>')
    .argument('<dst>')
    .option('-O, --output-format <fmt>', 'raw or kscinc (default kscinc)', parseFormat, 'ksc_inc' as ImageFormat)
    .option('--block-size <size>', 'block size of a kscinc output', sizeArg('--block-size'))
    .option('--force', 'replace an existing DST')
    .option('--json', 'print statistics as JSON')
    .addHelpText('after', '\nDST is written under a temporary name in its folder and renamed when complete; Ctrl-C removes it.')
    .action(async (src: string, dst: string, o: { outputFormat: ImageFormat; blockSize?: number; force?: boolean; json?: boolean }) => {
      const bar = progressBar('convert');
      const r = await convertImage(src, dst, { format: o.outputFormat, blockSize: o.blockSize, force: o.force, onProgress: bar.update, ...testPacing() }).finally(bar.stop);
      if (o.json) printJson(r);
      else println(`converted ${src} -> ${dst} (${formatName(o.outputFormat)}): read ${formatSize(r.bytesRead)}, wrote ${formatSize(r.bytesWritten)} in ${(r.durationMs / 1000).toFixed(2)} s`);
    });
}

/** kscinc snapshot: freeze IMAGE under a new overlay that takes the writes (and the bitmaps) from now on. */
function registerSnapshot(program: Command): void {
  program
    .command('snapshot')
    .description('freeze IMAGE under a new overlay that takes the writes (and the bitmaps) from now on')
    .argument('<image>')
    .argument('<new-overlay>')
    .option('--force', 'replace an existing NEW-OVERLAY')
    .action(async (image: string, overlay: string, o: { force?: boolean }) => {
      await snapshotImage(image, overlay, { force: o.force });
      println(`${overlay}: new overlay on ${image}`);
    });
}

/** kscinc commit: merge an overlay into its backing image and empty the overlay. */
function registerCommit(program: Command): void {
  program
    .command('commit')
    .description('merge an overlay into its backing image and empty the overlay')
    .argument('<overlay>')
    .action(async (overlay: string) => {
      const bar = progressBar('commit');
      const r = await commitImage(overlay, bar.update).finally(bar.stop);
      println(`committed ${r.blocks} blocks (${formatSize(r.bytes)}) of ${overlay} into its backing`);
    });
}

/** kscinc rebase: change the backing image; safe by default (the visible content stays the same). */
function registerRebase(program: Command): void {
  program
    .command('rebase')
    .description('change the backing image; safe by default (the visible content stays the same)')
    .argument('<image>')
    .requiredOption('--backing <file>', 'new backing image ("" for none)')
    .option('--backing-format <fmt>', 'raw or kscinc (default: detected)', parseFormat)
    .option('--unsafe', 'only rewrite the header; copy nothing')
    .action(async (image: string, o: { backing: string; backingFormat?: ImageFormat; unsafe?: boolean }) => {
      const bar = progressBar('rebase');
      const r = await rebaseImage(image, o.backing === '' ? null : o.backing, { unsafe: o.unsafe, format: o.backingFormat, onProgress: bar.update }).finally(bar.stop);
      println(`${image}: backing is now ${o.backing === '' ? 'none' : o.backing} (copied ${formatSize(r.copiedBytes)})`);
    });
}
