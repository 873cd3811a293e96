/** kscinc bitmap add|remove|clear|enable|disable|list|merge|show. */
import type { Command } from 'commander';
import { isHandoverBitmap } from '../engines/backup/bitmap-names.js';
import { openKsc } from '../image/open.js';
import type { DirtyBitmaps } from '../image/capabilities.js';
import { parseSize } from '../util/size.js';
import { formatSize, printJson, println } from './output.js';

/**
 * Bitmaps the backup engine keeps for itself (formats/repository.md §10). Its names module imports
 * nothing, so a list does not load the backup engine.
 */
export const isInternalBitmap = isHandoverBitmap;

async function withImage<T>(image: string, write: boolean, fn: (img: DirtyBitmaps) => Promise<T>): Promise<T> {
  const img = await openKsc(image, { write });
  try {
    return await fn(img);
  } finally {
    await img.close();
  }
}

export function registerBitmapCommands(program: Command): void {
  const bitmap = program.command('bitmap').description('manage persistent dirty bitmaps');

  bitmap
    .command('add')
    .argument('<image>')
    .argument('<name>')
    .option('--granularity <size>', 'bytes per bit (power of two, 4K … 64M; default: the block size)', (v) => parseSize(v, '--granularity'))
    .option('--disabled', 'create it disabled (not tracking writes)')
    .description('add a bitmap (enabled, all clear)')
    .action(async (image: string, name: string, o: { granularity?: number; disabled?: boolean }) => {
      await withImage(image, true, (img) => img.addBitmap(name, { granularity: o.granularity, enabled: !o.disabled }));
      println(`${image}: added bitmap "${name}"`);
    });

  const simple: [string, string, (img: DirtyBitmaps, name: string) => Promise<void>][] = [
    ['remove', 'remove a bitmap', (img, n) => img.removeBitmap(n)],
    ['clear', 'clear every bit of a bitmap', (img, n) => img.clearBitmap(n)],
    ['enable', 'start tracking writes in a bitmap', (img, n) => img.setBitmapEnabled(n, true)],
    ['disable', 'stop tracking writes in a bitmap (its bits are kept)', (img, n) => img.setBitmapEnabled(n, false)],
  ];
  for (const [verb, desc, fn] of simple) {
    bitmap
      .command(verb)
      .description(desc)
      .argument('<image>')
      .argument('<name>')
      .action(async (image: string, name: string) => {
        await withImage(image, true, (img) => fn(img, name));
        println(`${image}: ${verb} bitmap "${name}": done`);
      });
  }

  bitmap
    .command('list')
    .description('list bitmaps: name, granularity, enabled, dirty bytes (internal ones only with --all)')
    .argument('<image>')
    .option('--all', 'also the internal bitmaps backups keep (NAME#TOKEN, NAME~frozen)')
    .option('--json', 'print JSON')
    .addHelpText(
      'after',
      `
Internal bitmaps (hidden unless --all):
  NAME#TOKEN    empty marker: which backup in which repository NAME's bits count from (one per repository)
  NAME~frozen   the bits a backup under way is reading; merged back into NAME if that backup fails
Do not remove them while a backup runs; removing NAME#TOKEN makes the next backup through NAME a full one.`,
    )
    .action(async (image: string, o: { all?: boolean; json?: boolean }) => {
      const all = await withImage(image, false, (img) => img.listBitmaps());
      const list = o.all ? all : all.filter((b) => !isInternalBitmap(b.name));
      const hidden = all.length - list.length;
      if (o.json) return printJson(list);
      if (list.length === 0) println('no bitmaps');
      for (const b of list) {
        const state = `${b.consistent ? '' : '\tinconsistent'}${b.damage ? `\tdamaged: ${b.damage}` : ''}${isInternalBitmap(b.name) ? '\t(internal)' : ''}`;
        println(`${b.name}\tgranularity ${formatSize(b.granularity)}\t${b.enabled ? 'enabled' : 'disabled'}\tdirty ${formatSize(b.dirtyBytes)}${state}`);
      }
      if (hidden > 0) println(`(${hidden} internal bitmap${hidden === 1 ? '' : 's'} of backups not shown: --all)`);
    });

  bitmap
    .command('merge')
    .description('OR bitmap SRC into bitmap DST')
    .argument('<image>')
    .argument('<src>')
    .argument('<dst>')
    .action(async (image: string, src: string, dst: string) => {
      await withImage(image, true, (img) => img.mergeBitmap(src, dst));
      println(`${image}: merged "${src}" into "${dst}"`);
    });

  bitmap
    .command('show')
    .description('list the dirty extents of a bitmap')
    .argument('<image>')
    .argument('<name>')
    .option('--json', 'print JSON ([{offset, length}])')
    .action(async (image: string, name: string, o: { json?: boolean }) => {
      const extents = await withImage(image, false, (img) => img.bitmapExtents(name));
      if (o.json) return printJson(extents);
      for (const e of extents) println(`0x${e.offset.toString(16)}\t0x${e.length.toString(16)}`);
      println(`${extents.length} extents, ${formatSize(extents.reduce((s, e) => s + e.length, 0))} dirty`);
    });
}
