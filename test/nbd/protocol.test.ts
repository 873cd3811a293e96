/**
 * Protocol strictness (formats/nbd.md §1, §2.1, §3): per-command flags, BLOCK_STATUS past the end, an
 * over-long option, and dirty-bitmap contexts that follow the image (created while serving, internal ones
 * hidden, `--bitmap` limits, a live backup does not break a selected context). Raw sockets plus nbdinfo.
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { requestBackup } from '../../src/cli/control.js';
import { createImage, openKsc } from '../../src/image/open.js';
import { isLoopback } from '../../src/cli/serve-commands.js';
import { NbdServer } from '../../src/nbd/server.js';
import { CLIENT_FLAG_FIXED_NEWSTYLE, CLIENT_FLAG_NO_ZEROES, CMD, CMD_FLAG, ERR, OPT, REP, encodeOptionHeader } from '../../src/nbd/wire.js';
import { run } from '../helpers/cli.js';
import { tempDir } from '../helpers/tmp.js';
import { RawClient, goData, metaData, serve, u32 } from './helpers.js';

const dir = tempDir('kscinc-nbd-proto-');
const MiB = 1 << 20;

/** Greeting, flags, STRUCTURED_REPLY, then LIST or SET of `queries` on export "": the context names (with ids for SET). */
async function contexts(c: RawClient, opt: number, queries: string[]): Promise<{ id: number; name: string }[]> {
  const r = await c.option(opt, metaData('', queries));
  expect(r[r.length - 1]!.type).toBe(REP.ACK);
  return r.slice(0, -1).map((x) => ({ id: x.data.readUInt32BE(0), name: x.data.subarray(4).toString() }));
}

async function negotiating(port: number): Promise<RawClient> {
  const c = await RawClient.connect(port);
  await c.greeting();
  c.socket.write(u32(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES));
  expect((await c.option(OPT.STRUCTURED_REPLY))[0]!.type).toBe(REP.ACK);
  c.structured = true;
  return c;
}

async function go(c: RawClient): Promise<void> {
  const r = await c.option(OPT.GO, goData(''));
  expect(r[r.length - 1]!.type).toBe(REP.ACK);
}

async function inProcess(size = 8 * MiB): Promise<{ port: number; close: () => Promise<void> }> {
  const f = join(dir, `p${Math.random().toString(36).slice(2)}.ksc`);
  await createImage(f, { size });
  const dev = await openKsc(f, { write: true });
  const server = new NbdServer({ exports: { '': { device: dev } } });
  const port = ((await server.listen({ host: '127.0.0.1', port: 0 })) as { port: number }).port;
  return {
    port,
    close: async () => {
      await server.close();
      await dev.close();
    },
  };
}

describe('NBD protocol: requests', () => {
  it('flags a command does not take are EINVAL (as qemu-nbd and nbdkit); allowed ones work', async () => {
    const s = await inProcess();
    try {
      const c = await negotiating(s.port);
      await contexts(c, OPT.SET_META_CONTEXT, ['base:allocation']);
      await go(c);
      const bad: [number, number, Buffer?][] = [
        [CMD.READ, CMD_FLAG.NO_HOLE],
        [CMD.READ, CMD_FLAG.REQ_ONE],
        [CMD.READ, CMD_FLAG.FAST_ZERO],
        [CMD.WRITE, CMD_FLAG.DF, Buffer.alloc(4096)],
        [CMD.WRITE, CMD_FLAG.NO_HOLE, Buffer.alloc(4096)],
        [CMD.WRITE, CMD_FLAG.FAST_ZERO, Buffer.alloc(4096)],
        [CMD.TRIM, CMD_FLAG.NO_HOLE],
        [CMD.TRIM, CMD_FLAG.FAST_ZERO],
        [CMD.FLUSH, CMD_FLAG.REQ_ONE],
        [CMD.CACHE, CMD_FLAG.DF],
        [CMD.WRITE_ZEROES, CMD_FLAG.DF],
        [CMD.WRITE_ZEROES, CMD_FLAG.REQ_ONE],
        [CMD.BLOCK_STATUS, CMD_FLAG.DF],
        [CMD.BLOCK_STATUS, CMD_FLAG.NO_HOLE],
      ];
      let cookie = 1n;
      for (const [type, flags, payload] of bad) {
        c.send(type, cookie, 0, 4096, flags, payload);
        const r = await c.reply();
        expect(r.cookie).toBe(cookie);
        expect(r.error, `command ${type} flags ${flags}`).toBe(ERR.EINVAL);
        cookie++;
      }
      const good: [number, number, Buffer?][] = [
        [CMD.READ, CMD_FLAG.DF],
        [CMD.READ, CMD_FLAG.FUA],
        [CMD.WRITE, CMD_FLAG.FUA, Buffer.alloc(4096, 1)],
        [CMD.WRITE_ZEROES, CMD_FLAG.NO_HOLE | CMD_FLAG.FUA],
        [CMD.BLOCK_STATUS, CMD_FLAG.REQ_ONE],
        [CMD.FLUSH, CMD_FLAG.FUA],
        [CMD.TRIM, CMD_FLAG.FUA],
      ];
      for (const [type, flags, payload] of good) {
        c.send(type, cookie, 0, type === CMD.FLUSH ? 0 : 4096, flags, payload); // FLUSH: offset and length MUST be 0
        expect((await c.reply(type === CMD.READ ? 4096 : 0)).error, `command ${type} flags ${flags}`).toBe(0);
        cookie++;
      }
      c.socket.destroy();
    } finally {
      await s.close();
    }
  });

  it('DF without structured replies is EINVAL; BLOCK_STATUS past the end is EINVAL', async () => {
    const s = await inProcess();
    try {
      const simple = await RawClient.connect(s.port);
      await simple.handshake('', false);
      simple.send(CMD.READ, 1n, 0, 4096, CMD_FLAG.DF);
      expect((await simple.reply()).error).toBe(ERR.EINVAL);
      simple.socket.destroy();

      const c = await negotiating(s.port);
      await contexts(c, OPT.SET_META_CONTEXT, ['base:allocation']);
      await go(c);
      c.send(CMD.BLOCK_STATUS, 2n, 8 * MiB - 4096, 8192);
      expect((await c.reply()).error).toBe(ERR.EINVAL);
      c.send(CMD.BLOCK_STATUS, 3n, 8 * MiB - 4096, 4096);
      expect((await c.reply()).error).toBe(0);
      c.socket.destroy();
    } finally {
      await s.close();
    }
  });

  it('FLUSH with an offset or a length (reserved, MUST be zero) is EINVAL, as nbdkit answers', async () => {
    const s = await inProcess();
    try {
      const c = await negotiating(s.port);
      await go(c);
      const cases: [number, number, number][] = [
        [4096, 0, ERR.EINVAL],
        [0, 4096, ERR.EINVAL],
        [16 * MiB, 0, ERR.EINVAL],
        [0, 0, 0],
      ];
      let cookie = 1n;
      for (const [offset, length, error] of cases) {
        c.send(CMD.FLUSH, cookie, offset, length);
        const r = await c.reply();
        expect(r.cookie).toBe(cookie++);
        expect(r.error, `FLUSH ${offset}+${length}`).toBe(error);
      }
      c.socket.destroy();
    } finally {
      await s.close();
    }
  });

  it('an over-long option gets ERR_TOO_BIG and negotiation goes on', async () => {
    const s = await inProcess();
    try {
      const c = await negotiating(s.port);
      const big = Buffer.alloc(200 * 1024, 0x41);
      c.socket.write(Buffer.concat([encodeOptionHeader(OPT.GO, big.length), big]));
      const h = await c.reader.read(20);
      expect(h.readUInt32BE(8)).toBe(OPT.GO);
      expect(h.readUInt32BE(12)).toBe(REP.ERR_TOO_BIG);
      await c.reader.read(h.readUInt32BE(16));
      await go(c);
      expect((await c.read(0, 4096)).error).toBe(0);
      c.socket.destroy();
    } finally {
      await s.close();
    }
  });

  it('loopback addresses are told from the others (the warning of a non-loopback listen)', () => {
    for (const h of ['127.0.0.1', '127.1.2.3', '::1', '::ffff:127.0.0.1']) expect(isLoopback(h), h).toBe(true);
    for (const h of ['0.0.0.0', '::', '192.168.1.5', '10.0.0.1', 'fe80::1']) expect(isLoopback(h), h).toBe(false);
  });
});

describe('NBD protocol: dirty-bitmap contexts', () => {
  it('a bitmap created while serving is offered without restart, internal ones never, and a live backup keeps a selected context working', async () => {
    const img = join(dir, 'bm.ksc');
    await createImage(img, { size: 16 * MiB });
    const repo = join(dir, 'repo-bm');
    const srv = await serve([img, '--listen', '127.0.0.1:0']);
    const uri = srv.uris[0]!;
    const port = Number(/:(\d+)\//.exec(uri)![1]);
    try {
      const w = await RawClient.connect(port);
      await w.handshake('');
      w.send(CMD.WRITE, 1n, 0, MiB, 0, Buffer.alloc(MiB, 0x33));
      expect((await w.reply()).error).toBe(0);
      // The first backup through the control socket creates bitmap "backup" (and its token bitmap "backup#…").
      await requestBackup(img, { op: 'backup', repo });
      w.send(CMD.WRITE, 2n, 4 * MiB, 65536, 0, Buffer.alloc(65536, 0x44));
      expect((await w.reply()).error).toBe(0);

      const c = await negotiating(port);
      const listed = (await contexts(c, OPT.LIST_META_CONTEXT, [])).map((x) => x.name);
      expect(listed).toContain('qemu:dirty-bitmap:backup');
      expect(listed.filter((n) => n.includes('#') || n.endsWith('~frozen'))).toEqual([]);
      const set = await contexts(c, OPT.SET_META_CONTEXT, ['qemu:dirty-bitmap:backup']);
      expect(set.map((x) => x.name)).toEqual(['qemu:dirty-bitmap:backup']);
      await go(c);
      const dirty = async (): Promise<number[]> => {
        c.send(CMD.BLOCK_STATUS, 9n, 0, 16 * MiB);
        const r = await c.reply();
        expect(r.error).toBe(0);
        const p = r.chunks![0]!.payload;
        const out: number[] = [];
        for (let o = 4; o < p.length; o += 8) out.push(p.readUInt32BE(o), p.readUInt32BE(o + 4));
        return out;
      };
      expect(await dirty()).toEqual([4 * MiB, 0, 65536, 1, 12 * MiB - 65536, 0]);
      // A second (live) backup hands the bitmap over: the selected context keeps answering, now clean.
      const during = dirty();
      await requestBackup(img, { op: 'backup', repo });
      await during;
      expect(await dirty()).toEqual([16 * MiB, 0]);
      c.socket.destroy();
      w.socket.destroy();

      // A real client: nbdinfo maps the bitmap created while serving.
      const info = run('nbdinfo', ['--map=qemu:dirty-bitmap:backup', uri]);
      expect(info.code, info.stderr).toBe(0);
      expect(info.stdout).toMatch(/clean/);
      const ctx = run('nbdinfo', ['--content', '--list', '--json', uri]);
      expect(ctx.code, ctx.stderr).toBe(0);
      expect(ctx.stdout).toContain('qemu:dirty-bitmap:backup');
      expect(ctx.stdout).not.toMatch(/backup#|~frozen/);
    } finally {
      expect(await srv.stop()).toBe(0);
    }
  });

  it('serve --bitmap NAME (repeatable) offers only those bitmaps', async () => {
    const img = join(dir, 'only.ksc');
    await createImage(img, { size: 4 * MiB });
    const dev = await openKsc(img, { write: true });
    for (const b of ['a', 'b', 'c']) await dev.addBitmap(b);
    await dev.close();
    const srv = await serve([img, '--listen', '127.0.0.1:0', '--bitmap', 'a', '--bitmap', 'c']);
    try {
      const c = await negotiating(Number(/:(\d+)\//.exec(srv.uris[0]!)![1]));
      const listed = (await contexts(c, OPT.LIST_META_CONTEXT, ['qemu:dirty-bitmap:'])).map((x) => x.name);
      expect(listed).toEqual(['qemu:dirty-bitmap:a', 'qemu:dirty-bitmap:c']);
      expect(await contexts(c, OPT.SET_META_CONTEXT, ['qemu:dirty-bitmap:b'])).toEqual([]);
      c.socket.destroy();
    } finally {
      expect(await srv.stop()).toBe(0);
    }
    const bad = await serve([img, '--listen', '127.0.0.1:0', '--bitmap', 'zz']).then(
      () => 'started',
      (e: Error) => e.message,
    );
    expect(bad).toMatch(/no bitmap named "zz"/);
  });
});
