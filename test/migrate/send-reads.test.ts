/**
 * The migration's sender keeps at most SOURCE_READS source reads in flight (src/engines/migrate-send.ts),
 * while its network requests stay pipelined up to the target's parallelism. Before, every request in flight
 * (32: 2 connections × 16) read its 1 MiB at once; those reads queued in libuv's 4-thread pool ahead of the
 * VM's own writes, which then waited up to 2 s (bench/migrate.mjs: writer p99 ≈ 250 ms, worst 2–3 s).
 */
import { describe, expect, it } from 'vitest';
import { Sender, SOURCE_READS, type MigrationTarget } from '../../src/engines/migrate-send.js';
import type { BlockDevice } from '../../src/image/types.js';

const MiB = 1024 * 1024;
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

describe('migration sender', () => {
  it('reads the source at most SOURCE_READS at a time, and still keeps many writes in flight', async () => {
    let reads = 0;
    let maxReads = 0;
    const dev = {
      size: 64 * MiB,
      read: async (_o: number, n: number): Promise<Buffer> => {
        maxReads = Math.max(maxReads, ++reads);
        await sleep(2);
        reads--;
        return Buffer.alloc(n, 1);
      },
    } as unknown as BlockDevice;
    let writes = 0;
    let maxWrites = 0;
    let written = 0;
    const target: MigrationTarget = {
      size: 64 * MiB,
      maxPayload: 32 * MiB,
      parallelism: 32,
      write: async (_o, d) => {
        maxWrites = Math.max(maxWrites, ++writes);
        await sleep(30);
        writes--;
        written += d.length;
      },
      writeZeroes: async () => undefined,
      flush: async () => undefined,
      complete: async () => undefined,
      close: async () => undefined,
      destroy: () => undefined,
    };
    const s = new Sender(dev, target, undefined);
    await s.send(0, 48 * MiB);
    await s.drain();
    expect(written).toBe(48 * MiB);
    expect(maxReads, 'source reads in flight').toBeLessThanOrEqual(SOURCE_READS);
    expect(maxWrites, 'network writes in flight (pipelined)').toBeGreaterThan(4 * SOURCE_READS);
  });
});
