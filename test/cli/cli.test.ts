/** The kscinc CLI end to end: every command, --json shapes, and one-line errors with non-zero exit codes. */
import { readFileSync, writeFileSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it, expect } from 'vitest';
import { kscinc, run } from '../helpers/cli.js';
import { tempDir } from '../helpers/tmp.js';

const dir = tempDir();
const p = (f: string): string => join(dir, f);

function ok(args: string[]): string {
  const r = kscinc(args);
  expect(r.stderr, `kscinc ${args.join(' ')}`).toBe('');
  expect(r.code, `kscinc ${args.join(' ')}`).toBe(0);
  return r.stdout;
}

function fails(args: string[], code: number, pattern: RegExp): void {
  const r = kscinc(args);
  expect(r.code).toBe(code);
  expect(r.stderr).toMatch(pattern);
  expect(r.stderr.trim().split('\n')).toHaveLength(1); // one line, no stack trace
  expect(r.stderr).not.toMatch(/\n\s+at /);
}

describe('kscinc CLI', () => {
  it('create, write, info, map, bitmap show, convert back to raw, compare', () => {
    run('truncate', ['-s', '16M', p('base.raw')]);
    const pattern = Buffer.alloc(200000, 0x42);
    writeFileSync(p('pattern.bin'), pattern);
    ok(['write', p('base.raw'), '1M', '--from', p('pattern.bin')]);
    ok(['create', p('ov.ksc'), '--backing', p('base.raw'), '--block-size', '64K']);
    ok(['bitmap', 'add', p('ov.ksc'), 'backup']);
    ok(['write', p('ov.ksc'), '4M', '--from', p('pattern.bin'), '--length', '70000']);

    const info = JSON.parse(ok(['info', p('ov.ksc'), '--json']));
    expect(info.format).toBe('ksc_inc');
    expect(info.virtualSize).toBe(16 << 20);
    expect(info.blockSize).toBe(65536);
    expect(info.diskUuid).toMatch(/^[0-9a-f-]{36}$/);
    expect(info.backingChain).toEqual([{ file: p('base.raw'), format: 'raw' }]);
    expect(info.bitmaps).toEqual([{ name: 'backup', granularity: 65536, enabled: true, dirtyBytes: 131072, consistent: true, damage: null }]);
    expect(info.allocatedBytes).toBeGreaterThan(0);

    const map = JSON.parse(ok(['map', p('ov.ksc'), '--json']));
    expect(map.find((e: { offset: number }) => e.offset === 4 << 20)).toEqual({ offset: 4 << 20, length: 131072, state: 'data', depth: 0 });
    expect(map.some((e: { state: string; depth: number }) => e.state === 'data' && e.depth === 1)).toBe(true);
    expect(map.reduce((s: number, e: { length: number }) => s + e.length, 0)).toBe(16 << 20);

    expect(JSON.parse(ok(['bitmap', 'show', p('ov.ksc'), 'backup', '--json']))).toEqual([{ offset: 4 << 20, length: 131072 }]);

    ok(['convert', p('ov.ksc'), p('out.raw'), '-O', 'raw']);
    const expected = readFileSync(p('base.raw'));
    pattern.subarray(0, 70000).copy(expected, 4 << 20);
    writeFileSync(p('expected.raw'), expected);
    const cmp = run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', p('out.raw'), p('expected.raw')]);
    expect(cmp.stdout).toContain('Images are identical');

    const back = kscinc(['read', p('ov.ksc'), String(4 << 20), '70000']);
    expect(Buffer.from(back.stdout, 'latin1').length).toBeGreaterThan(0);
    ok(['read', p('ov.ksc'), '4M', '70000', '--to', p('readback.bin')]);
    expect(readFileSync(p('readback.bin')).equals(pattern.subarray(0, 70000))).toBe(true);
  });

  it('bitmap lifecycle: list, disable, enable, merge, clear, remove', () => {
    ok(['create', p('bm.ksc'), '--size', '8M']);
    ok(['bitmap', 'add', p('bm.ksc'), 'a']);
    ok(['bitmap', 'add', p('bm.ksc'), 'b', '--granularity', '1M']);
    writeFileSync(p('x.bin'), Buffer.alloc(4096, 1));
    ok(['write', p('bm.ksc'), '0', '--from', p('x.bin')]);
    ok(['bitmap', 'disable', p('bm.ksc'), 'b']);
    ok(['write', p('bm.ksc'), '5M', '--from', p('x.bin')]);
    let list = JSON.parse(ok(['bitmap', 'list', p('bm.ksc'), '--json']));
    expect(list.map((b: { name: string; enabled: boolean; dirtyBytes: number }) => [b.name, b.enabled, b.dirtyBytes])).toEqual([
      ['a', true, 131072],
      ['b', false, 1 << 20],
    ]);
    ok(['bitmap', 'merge', p('bm.ksc'), 'a', 'b']);
    expect(JSON.parse(ok(['bitmap', 'show', p('bm.ksc'), 'b', '--json']))).toEqual([
      { offset: 0, length: 1 << 20 },
      { offset: 5 << 20, length: 1 << 20 },
    ]);
    ok(['bitmap', 'enable', p('bm.ksc'), 'b']);
    ok(['bitmap', 'clear', p('bm.ksc'), 'a']);
    expect(JSON.parse(ok(['bitmap', 'show', p('bm.ksc'), 'a', '--json']))).toEqual([]);
    ok(['bitmap', 'remove', p('bm.ksc'), 'a']);
    list = JSON.parse(ok(['bitmap', 'list', p('bm.ksc'), '--json']));
    expect(list.map((b: { name: string }) => b.name)).toEqual(['b']);
    fails(['bitmap', 'show', p('bm.ksc'), 'a'], 1, /no bitmap named "a"/);
    fails(['bitmap', 'add', p('bm.ksc'), 'b'], 1, /already exists/);
  });

  it('snapshot, commit, rebase and check', () => {
    ok(['create', p('s0.ksc'), '--size', '4M']);
    writeFileSync(p('y.bin'), Buffer.alloc(65536, 7));
    ok(['write', p('s0.ksc'), '0', '--from', p('y.bin')]);
    ok(['bitmap', 'add', p('s0.ksc'), 'inc']);
    ok(['snapshot', p('s0.ksc'), p('s1.ksc')]);
    const i0 = JSON.parse(ok(['info', p('s0.ksc'), '--json']));
    const i1 = JSON.parse(ok(['info', p('s1.ksc'), '--json']));
    expect(i1.diskUuid).toBe(i0.diskUuid);
    expect(i1.bitmaps.map((b: { name: string }) => b.name)).toEqual(['inc']);
    writeFileSync(p('z.bin'), Buffer.alloc(65536, 9));
    ok(['write', p('s1.ksc'), '64K', '--from', p('z.bin')]);
    expect(ok(['commit', p('s1.ksc')])).toMatch(/committed 1 blocks/);
    ok(['read', p('s0.ksc'), '64K', '64K', '--to', p('c.bin')]);
    expect(readFileSync(p('c.bin')).equals(Buffer.alloc(65536, 9))).toBe(true);
    // Rebase s1 onto nothing: safe mode copies what it read from s0.
    ok(['rebase', p('s1.ksc'), '--backing', '']);
    expect(JSON.parse(ok(['info', p('s1.ksc'), '--json'])).backingChain).toEqual([]);
    ok(['read', p('s1.ksc'), '0', '128K', '--to', p('d.bin')]);
    expect(readFileSync(p('d.bin')).equals(Buffer.concat([Buffer.alloc(65536, 7), Buffer.alloc(65536, 9)]))).toBe(true);
    const check = JSON.parse(ok(['check', p('s1.ksc'), '--verify', '--json']));
    expect(check.ok).toBe(true);
    expect(check.verify.checked).toBe(2);
    expect(check.verify.mismatches).toEqual([]);
  });

  it('errors are one line on stderr with a non-zero exit code', () => {
    fails(['info', p('missing.ksc')], 1, /missing\.ksc: no such file/);
    fails(['create', p('nosize.ksc')], 1, /a size is needed/);
    fails(['create', p('bad.ksc'), '--size', '12Q'], 64, /not a size/);
    fails(['create', p('bad.ksc'), '--size', '1M', '--block-size', '3000'], 1, /block size 3000/);
    expect(existsSync(p('bad.ksc'))).toBe(false);
    writeFileSync(p('garbage.ksc'), Buffer.concat([Buffer.from('KSC_INC\0'), Buffer.alloc(10000, 0xff)]));
    fails(['info', p('garbage.ksc')], 1, /garbage\.ksc.*header/);
    fails(['bitmap', 'add', p('base.raw'), 'x'], 1, /raw image, not ksc_inc/);
    fails(['nosuchcommand'], 64, /unknown command/);
    const dbg = kscinc(['--debug', 'info', p('missing.ksc')]);
    expect(dbg.code).toBe(1);
    expect(dbg.stderr).toMatch(/\n\s+at /);
  });
});
