/**
 * Hostile: the CLI bundle loads engines lazily, in the actions (session 16). Every command and subcommand
 * `kscinc --help` lists (walked from the help, not from a list kept here) is run from the built bundle into
 * its action: each <argument> given as a path that does not exist, so the action starts, imports what it
 * needs and fails on its input. None may fail to load code (Cannot find module, ReferenceError, "is not a
 * function/constructor", SyntaxError) or hang. Run from another folder, and from a copy of the package in
 * another folder (dist/, native/build and package.json copied, node_modules linked).
 */
import { spawnSync } from 'node:child_process';
import { cpSync, mkdirSync, symlinkSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { spawnKilled } from '../helpers/cli.js';
import { tempDir } from '../helpers/tmp.js';

const ROOT = fileURLToPath(new URL('../../', import.meta.url));
const dir = tempDir('kscinc-hostile-walk-');
const REQUIRED = /required option '(--[\w-]+)[^']*' not specified/;
const LOAD_FAILURE = /Cannot find module|ReferenceError|is not a function|is not a constructor|SyntaxError|ERR_MODULE_NOT_FOUND|ERR_REQUIRE/;

/** The command names a help text lists under "Commands:" (without `help`). */
function commandsOf(help: string): { name: string; usage: string }[] {
  const at = help.indexOf('\nCommands:\n');
  if (at < 0) return [];
  const out: { name: string; usage: string }[] = [];
  for (const line of help.slice(at + 11).split('\n')) {
    if (/^ {3,}\S/.test(line)) continue; // a description wrapped onto more lines
    if (!/^ {2}\S/.test(line)) break;
    const usage = line.trim().split(/ {2,}/)[0]!;
    const name = usage.split(' ')[0]!;
    if (name !== 'help') out.push({ name, usage });
  }
  return out;
}

function help(cli: string, words: string[]): string {
  const r = spawnSync(cli, [...words, '--help'], { encoding: 'utf8', cwd: dir });
  expect(r.stderr, `kscinc ${words.join(' ')} --help`).not.toMatch(LOAD_FAILURE);
  return r.stdout;
}

/** Every leaf command: its words and its usage line (from its parent's help). */
function walk(cli: string): { words: string[]; usage: string }[] {
  const leaves: { words: string[]; usage: string }[] = [];
  const visit = (words: string[], usage: string): void => {
    const subs = commandsOf(help(cli, words));
    if (subs.length === 0 && words.length > 0) leaves.push({ words, usage });
    for (const s of subs) visit([...words, s.name], s.usage);
  };
  visit([], '');
  return leaves;
}

async function runTo(cli: string, args: string[], cwd: string): Promise<{ code: number | null; signal: string | null; out: string }> {
  const r = await spawnKilled(cli, args, { cwd, env: { KSCINC_PASSWORD_FILE: '/nonexistent-kscinc/pw' } });
  return { code: r.code, signal: r.signal, out: r.stdout + r.stderr };
}

async function everyCommand(cli: string, cwd: string): Promise<number> {
  const leaves = walk(cli);
  expect(leaves.length).toBeGreaterThan(20);
  const missing = '/nonexistent-kscinc';
  const failures: string[] = [];
  const reached: string[] = [];
  // A few at a time: the machine is shared.
  for (let i = 0; i < leaves.length; i += 4) {
    await Promise.all(
      leaves.slice(i, i + 4).map(async ({ words, usage }) => {
        const args = [...usage.matchAll(/<([^>]+)>/g)].map((m) => (/^(offset|length)$/.test(m[1]!) ? '4096' : `${missing}/${m[1]!.replace(/\W/g, '')}`));
        // `completion <shell>` and the like take a word, not a path: a path is still a bad one.
        // Required options, as the CLI names them, get a missing path too (then the action runs).
        let r = await runTo(cli, [...words, ...args], cwd);
        for (let m = REQUIRED.exec(r.out); m && args.length < 12; m = REQUIRED.exec(r.out)) {
          args.push(m[1]!, `${missing}/${m[1]!.replace(/\W/g, '')}`);
          r = await runTo(cli, [...words, ...args], cwd);
        }
        const what = `kscinc ${[...words, ...args].join(' ')} -> ${r.signal ?? r.code}: ${r.out.slice(0, 600)}`;
        if (r.signal !== null || LOAD_FAILURE.test(r.out) || r.code === 0 || REQUIRED.test(r.out)) failures.push(what);
        if (/missing required argument|unknown option|too many arguments/.test(r.out)) failures.push(`${what} (the walk built a bad command line)`);
        reached.push(`${[...words, ...args].join(' ')}: ${r.out.split('\n')[0]!.slice(0, 160)}`);
      }),
    );
  }
  expect(failures, failures.join('\n')).toEqual([]);
  expect(reached.length).toBe(leaves.length);
  return leaves.length;
}

describe('every kscinc command runs into its action from the bundle', () => {
  it('from another folder', async () => {
    const n = await everyCommand(join(ROOT, 'dist', 'cli', 'kscinc.cjs'), dir);
    console.log(`${n} commands`);
  }, 900_000);

  it('from a copy of the package in another folder', async () => {
    const pkg = join(dir, 'pkg');
    mkdirSync(join(pkg, 'native'), { recursive: true });
    cpSync(join(ROOT, 'dist'), join(pkg, 'dist'), { recursive: true, preserveTimestamps: true });
    cpSync(join(ROOT, 'native', 'build'), join(pkg, 'native', 'build'), { recursive: true });
    cpSync(join(ROOT, 'package.json'), join(pkg, 'package.json'));
    symlinkSync(join(ROOT, 'node_modules'), join(pkg, 'node_modules'));
    await everyCommand(join(pkg, 'dist', 'cli', 'kscinc.cjs'), '/');
  }, 900_000);
});
