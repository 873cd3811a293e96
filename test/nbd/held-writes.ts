/**
 * An in-process NBD server over a ksc_inc image whose host-file writes a test can hold back (and make fail):
 * for tests that look at what the server and the image hold, or answer, while writes are under way.
 */
import { createImage, openImage } from '../../src/image/open.js';
import type { BlockDevice } from '../../src/image/types.js';
import { type FileOpener, type HostFile, openHostFile } from '../../src/io/file.js';
import { NbdServer } from '../../src/nbd/server.js';

/** What the opener's files do: set `hold` / `fail` to hold back or fail their writes; `held` are the waiting ones. */
export interface WriteControl {
  /** Data writes (writeWithCrcs; with `allWrites`, also write and writev) wait while set. */
  hold: boolean;
  /** Resolvers of the writes waiting now: call one to let its write go. */
  held: (() => void)[];
  /** Data writes (writeWithCrcs) fail with EIO while set. */
  fail: boolean;
  /** Syncs of the host file so far. */
  syncs: number;
  /** Runs at each data write, before it may wait. */
  sample: () => void;
}

/**
 * A FileOpener whose files' data writes (writeWithCrcs: metadata goes by write) run `st.sample`, wait while
 * `st.hold` and fail while `st.fail`; with `allWrites`, write and writev also wait while `st.hold`.
 */
export function controlledOpener(st: WriteControl, allWrites = false): FileOpener {
  const wait = async (): Promise<void> => {
    if (st.hold) await new Promise<void>((r) => st.held.push(r));
  };
  return async (p, o) => {
    const f: HostFile = await openHostFile(p, o);
    const sync = f.sync.bind(f);
    f.sync = async () => {
      st.syncs++;
      return sync();
    };
    if (allWrites) {
      const write = f.write.bind(f);
      const writev = f.writev.bind(f);
      f.write = async (buf, pos) => (await wait(), write(buf, pos));
      f.writev = async (bufs, pos) => (await wait(), writev(bufs, pos));
    }
    const withCrcs = f.writeWithCrcs?.bind(f);
    if (withCrcs) {
      f.writeWithCrcs = async (buf, pos, bs, lo, hi) => {
        st.sample();
        await wait();
        if (st.fail) throw Object.assign(new Error('EIO: injected'), { code: 'EIO' });
        return withCrcs(buf, pos, bs, lo, hi);
      };
    }
    return f;
  };
}

/** Stops holding and lets every held write go. */
export function releaseHeld(st: WriteControl): void {
  st.hold = false;
  for (const r of st.held.splice(0)) r();
}

/** Waits (5 ms steps, at most `tries`) until at least n writes are held; the number held then. */
export async function heldAtLeast(st: WriteControl, n: number, tries = 400): Promise<number> {
  for (let i = 0; i < tries && st.held.length < n; i++) await new Promise((r) => setTimeout(r, 5));
  return st.held.length;
}

/** An NBD server exporting `dev` as "a" on 127.0.0.1, with `limit` as both its per-connection and total admission budgets. */
export async function serveDevice(dev: BlockDevice, limit?: number): Promise<{ server: NbdServer; port: number }> {
  const server = new NbdServer({ exports: { a: { device: dev } }, maxPendingBytes: limit, maxTotalPendingBytes: limit, log: () => {} });
  const a = await server.listen({ host: '127.0.0.1', port: 0 });
  return { server, port: (a as { port: number }).port };
}

export interface HeldServer {
  st: WriteControl;
  dev: BlockDevice;
  server: NbdServer;
  port: number;
  /** Closes the server, then the image. */
  close: () => Promise<void>;
}

/**
 * Creates an image at `path`, opens it writable through controlledOpener, lets `prepare` write to it (before
 * any server: e.g. to load map pages or allocate blocks), then serves it (serveDevice).
 */
export async function heldServer(path: string, opts: { size: number; blockSize: number; allWrites?: boolean; limit?: number; prepare?: (dev: BlockDevice) => Promise<void> }): Promise<HeldServer> {
  const st: WriteControl = { hold: false, held: [], fail: false, syncs: 0, sample: () => {} };
  await createImage(path, { size: opts.size, blockSize: opts.blockSize });
  const dev = await openImage(path, { write: true, opener: controlledOpener(st, opts.allWrites) });
  try {
    await opts.prepare?.(dev);
    const { server, port } = await serveDevice(dev, opts.limit);
    return {
      st,
      dev,
      server,
      port,
      close: async () => {
        await server.close();
        await dev.close();
      },
    };
  } catch (e) {
    await dev.close();
    throw e;
  }
}
