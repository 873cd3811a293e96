/**
 * Durable file replacement, shared by the folder object store and the schedule state file: write a new file
 * (O_EXCL), fsync it, rename it over the target, fsync the folder. A reader sees the old contents or the
 * new, never a mix; after a power cut the rename is either done or not.
 */
import { constants as fsc } from 'node:fs';
import { open, rename, unlink } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { pendingFiles } from './pending.js';
import { createFile } from './create.js';

/** Writes `parts` into a new file (it must not exist), then fsyncs it unless `durable` is false. */
export async function writeNewFile(file: string, parts: Iterable<Buffer>, durable = true, expectedSize?: number): Promise<void> {
  const fh = await createFile(file, fsc.O_WRONLY | fsc.O_EXCL);
  try {
    // writev takes at most IOV_MAX buffers per call and may write less than asked. Parts are taken as they
    // are made, 8 MiB at a time at most (a body made as it is sent is never held whole).
    let size = 0;
    let batch: Buffer[] = [];
    let batchBytes = 0;
    const flush = async (): Promise<void> => {
      while (batch.length > 0) {
        let { bytesWritten } = await fh.writev(batch);
        while (batch.length > 0 && bytesWritten >= batch[0]!.length) bytesWritten -= batch.shift()!.length;
        if (bytesWritten > 0) batch[0] = batch[0]!.subarray(bytesWritten);
      }
      batchBytes = 0;
    };
    for (const b of parts) {
      if (b.length === 0) continue;
      batch.push(b);
      batchBytes += b.length;
      size += b.length;
      if (batch.length >= 512 || batchBytes >= 8 * 1024 * 1024) await flush();
    }
    await flush();
    batch = [];
    if (expectedSize !== undefined && size !== expectedSize) throw new Error(`${file}: the body made ${size} bytes, not the ${expectedSize} it declared`);
    if (durable) await fh.sync();
  } finally {
    await fh.close();
  }
}

/** fsync of a folder: makes the names created, renamed or removed in it durable. */
export async function syncDir(dir: string): Promise<void> {
  const fh = await open(dir, fsc.O_RDONLY | fsc.O_DIRECTORY);
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/**
 * Replaces `path` with `data` atomically and durably, through a temporary file next to it. On failure the
 * temporary file is removed and the error (the raw fs error) is thrown; `path` is unchanged.
 */
export async function replaceFile(path: string, data: string | Buffer): Promise<void> {
  const dir = dirname(path);
  const temp = join(dir, `.${basename(path)}.${process.pid}.${randomBytes(6).toString('hex')}.tmp`);
  pendingFiles.add(temp); // the CLI removes it when interrupted by a signal
  try {
    await writeNewFile(temp, [typeof data === 'string' ? Buffer.from(data, 'utf8') : data]);
    await rename(temp, path);
    await syncDir(dir);
  } catch (e) {
    await unlink(temp).catch(() => undefined);
    throw e;
  } finally {
    pendingFiles.delete(temp);
  }
}
