/** kscinc write / read: byte-level access for scripts and tests. */
import { constants as fsc, createReadStream, promises as fsp } from 'node:fs';
import type { Command } from 'commander';
import { KscError } from '../errors.js';
import { openImage } from '../image/open.js';
import { buildNewFile } from '../io/newfile.js';
import { createFile } from '../io/create.js';
import { parseSize } from '../util/size.js';
import { println } from './output.js';

const CHUNK = 4 << 20;

export function registerIoCommands(program: Command): void {
  program
    .command('write')
    .description('write the bytes of FILE ("-" for stdin) into IMAGE at OFFSET')
    .argument('<image>')
    .argument('<offset>', 'byte offset (K/M/G suffixes allowed)', (v) => parseSize(v, 'offset'))
    .requiredOption('--from <file>', 'source of the bytes ("-" for stdin)')
    .option('--length <n>', 'write only the first N bytes', (v) => parseSize(v, '--length'))
    .option('--fua', 'make the write durable before returning')
    .option('--force', 'write even to a frozen image (the backing of a snapshot overlay) or one migrated away (a stale copy)')
    .action(async (image: string, offset: number, o: { from: string; length?: number; fua?: boolean; force?: boolean }) => {
      const dev = await openImage(image, { write: true, force: o.force, migratedAway: o.force });
      let written = 0;
      try {
        const stream = o.from === '-' ? process.stdin : createReadStream(o.from, { highWaterMark: CHUNK });
        for await (const chunk of stream as AsyncIterable<Buffer>) {
          const want = o.length === undefined ? chunk.length : Math.min(chunk.length, o.length - written);
          if (want <= 0) break;
          await dev.write(offset + written, chunk.subarray(0, want));
          written += want;
        }
        if (o.length !== undefined && written < o.length) {
          throw new KscError('KSC_E_INVALID', `${o.from}: only ${written} bytes available, --length asked for ${o.length}`);
        }
        await dev.flush();
      } finally {
        await dev.close();
      }
      println(`wrote ${written} bytes at offset ${offset}`);
    });

  program
    .command('read')
    .description('read LENGTH bytes of IMAGE at OFFSET to stdout or a file')
    .argument('<image>')
    .argument('<offset>', 'byte offset', (v) => parseSize(v, 'offset'))
    .argument('<length>', 'byte count', (v) => parseSize(v, 'length'))
    .option('--to <file>', 'write the bytes to this file (made whole, then named; a device is written in place)')
    .addHelpText('after', '\nWithout --to the bytes go to stdout, which must not be a terminal.')
    .action(async (image: string, offset: number, length: number, o: { to?: string }) => {
      if (!o.to && process.stdout.isTTY) {
        throw new KscError('KSC_E_INVALID', `read: not writing ${length} bytes of binary data to a terminal: use --to FILE or a pipe`);
      }
      const dev = await openImage(image);
      try {
        const copy = async (out: { write(b: Buffer): Promise<unknown> } | null): Promise<void> => {
          for (let done = 0; done < length; done += CHUNK) {
            const buf = await dev.read(offset + done, Math.min(CHUNK, length - done));
            if (out) await out.write(buf);
            else if (!process.stdout.write(buf)) await new Promise((r) => process.stdout.once('drain', r));
          }
        };
        if (!o.to) return await copy(null);
        const st = await fsp.stat(o.to).catch(() => null);
        if (st && !st.isFile() && !st.isDirectory()) {
          // A device or a pipe (/dev/null, a FIFO): written in place, never replaced (nor created: it exists).
          const fh = await fsp.open(o.to, fsc.O_WRONLY);
          try {
            await copy(fh);
          } finally {
            await fh.close();
          }
          return;
        }
        await buildNewFile(o.to, { force: true }, async (temp) => {
          const fh = await createFile(temp);
          try {
            await copy(fh);
            await fh.sync();
          } finally {
            await fh.close();
          }
        });
      } finally {
        await dev.close();
      }
    });
}
