/**
 * Every open of src/ that creates a file on libuv's threads goes through src/io/create.ts createFile, which
 * tracks it for the signal handler (src/cli/program.ts waits for creates in flight before it removes the
 * temporaries and exits; test/cli/signal-creates). A create anywhere else — O_CREAT, a 'w'/'wx'/'a' flag,
 * fs.writeFile, appendFile, copyFile, createWriteStream — fails this test. Synchronous creates finish before
 * any handler runs; the few there are are listed below with what they make.
 */
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';

const src = fileURLToPath(new URL('../../src', import.meta.url));
const HOME = 'io/create.ts';

/** Synchronous creates (file → how many), each with what it makes. */
const SYNC_CREATES: Record<string, number> = {
  'repo/chunklist.ts': 1, // an unnamed spill file: created, unlinked and its folder removed in one synchronous step
  'repo/repository.ts': 1, // init's plain key file, written whole before init goes on
  'cli/code-cache.cts': 1, // the bundle's V8 code cache, written when the process exits
  'io/fault.ts': 1, // the fault layer's step count (tests), written when the process exits
};

function files(dir: string): string[] {
  return readdirSync(dir).flatMap((f) => {
    const p = join(dir, f);
    return statSync(p).isDirectory() ? files(p) : /\.c?ts$/.test(p) ? [p] : [];
  });
}

/** Comments out: what is left is code (a create named in a comment is no create). */
function code(text: string): string {
  return text.replace(/\/\*[\s\S]*?\*\//g, '').replace(/(^|[^:'"`\\])\/\/.*$/gm, '$1');
}

const FLAG = String.raw`['"\`](?:w|wx|w\+|wx\+|a|ax|a\+|ax\+)['"\`]`;
const OPEN_FLAG = new RegExp(String.raw`\bopen(?:Sync)?\s*\([^;]*?,\s*${FLAG}`);
const FLAG_OPTION = new RegExp(String.raw`flag:\s*${FLAG}`);
/** fs's own writeFile & co. (bare or as fs., fsp., promises.); a handle's writeFile writes a file already open. */
const FS_WRITER = /(?:(?<![\w$.])|\b(?:fsp|fs|promises)\.)(?:writeFile|appendFile|copyFile|createWriteStream)(?:Sync)?\s*\(/;

/** The creates in `text`, each with whether it is synchronous and its line. */
function creates(text: string): { sync: boolean; line: string }[] {
  const found: { sync: boolean; line: string }[] = [];
  for (const line of code(text).split('\n')) {
    const sync = /Sync\s*\(/.test(line);
    if (/\bO_CREAT\b/.test(line) || OPEN_FLAG.test(line) || FLAG_OPTION.test(line) || FS_WRITER.test(line)) found.push({ sync, line: line.trim() });
  }
  return found;
}

describe('file creation', () => {
  it('the matcher sees the creates it is for, and not writes to an open handle', () => {
    for (const c of [
      `const fh = await fsp.open(temp, 'wx');`,
      `fh = await open(file, fsc.O_WRONLY | fsc.O_CREAT | fsc.O_EXCL, 0o644);`,
      `await fsp.writeFile(lockPath, body, { flag: 'wx' });`,
      `await writeFile(path, data);`,
      `const out = createWriteStream(target);`,
      `await copyFile(a, b);`,
      `this.fd = openSync(path, 'w+');`,
    ])
      expect(creates(c), c).toHaveLength(1);
    for (const c of [`await fh.writeFile(body);`, `fh = await open(file, fsc.O_RDONLY);`, `// open(x, 'w') in a comment`, `await this.out.writeFile(buf);`]) expect(creates(c), c).toHaveLength(0);
  });

  it(`src/ creates files on libuv's threads only through ${HOME}`, () => {
    const bad: string[] = [];
    const sync: Record<string, number> = {};
    for (const f of files(src)) {
      const rel = relative(src, f);
      if (rel === HOME) continue;
      for (const c of creates(readFileSync(f, 'utf8'))) {
        if (c.sync) sync[rel] = (sync[rel] ?? 0) + 1;
        else bad.push(`${rel}: ${c.line}`);
      }
    }
    expect(bad, `creates outside ${HOME} createFile (a signal's handler does not wait for them)`).toEqual([]);
    expect(sync, 'synchronous creates: list a new one in SYNC_CREATES with what it makes').toEqual(SYNC_CREATES);
  });

  it(`${HOME} tracks its open, and adds O_CREAT to numeric flags`, () => {
    expect(readFileSync(join(src, HOME), 'utf8')).toMatch(/trackCreate\(open\(path, typeof flags === 'number' \? flags \| fsc\.O_CREAT : flags, mode\)\)/);
  });
});
