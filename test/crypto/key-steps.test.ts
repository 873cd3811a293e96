/**
 * Key management stopped after EVERY step (formats/repository.md §13.3 rule 4): `kscinc repo init --encrypt`,
 * `key passwd`, `key add` and `key remove`, each SIGKILLed by its fault layer (io/fault.ts, KSC_FAULT_AFTER=N:
 * every durable put or delete of the store is a step) for N = 0, 1, … until a run completes. After each stop
 * the repository opens with the old password or the new one — never neither — and a re-run completes:
 *  - init: no repository yet (a re-run of init creates it), or one that opens with the password;
 *  - passwd A → B: A or B opens (both between the new key's put and the old one's delete); when done, B only;
 *  - add B: A always opens; when done, B too;
 *  - remove A's key (with B's password): B always opens; when done, A no longer.
 * And the last key: refused by `key remove` with a key file, nothing changed.
 */
import { spawnSync } from 'node:child_process';
import { cpSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { CLI, kscinc } from '../helpers/cli.js';
import { passwordFile, tempDir } from '../helpers/tmp.js';

const dir = tempDir('kscinc-key-steps-');
const pw = (name: string, value: string): string => passwordFile(dir, name, value);
const A = pw('a', 'password A');
const B = pw('b', 'password B');
const env = (p: string, newP?: string): Record<string, string | undefined> => ({ KSCINC_PASSWORD_FILE: p, KSCINC_NEW_PASSWORD_FILE: newP });
const opens = (repo: string, p: string): boolean => kscinc(['key', 'list', '--repo', repo, '--json'], { env: env(p) }).code === 0;
const keyIds = (repo: string): string[] => readdirSync(join(repo, 'keys')).map((f) => f.replace(/\.key$/, ''));
/** Guards the loops: no command here takes anywhere near this many steps. */
const MAX_STEPS = 20;

/** `kscinc ARGS` SIGKILLed after step `n`; `done`: it completed (exit 0) before the fault fired. */
function stoppedAfter(args: string[], n: number, e: Record<string, string | undefined>): { done: boolean; steps: number | null; stderr: string } {
  const count = join(dir, 'count');
  rmSync(count, { force: true });
  const r = spawnSync(process.execPath, [CLI, ...args], { env: { ...process.env, ...e, KSC_FAULT_AFTER: String(n), KSC_FAULT_COUNT_FILE: count }, encoding: 'utf8' });
  if (r.status !== 0) expect(r.signal, `step ${n}: ${r.stderr}`).toBe('SIGKILL');
  return { done: r.status === 0, steps: r.status === 0 ? Number(readFileSync(count, 'utf8')) : null, stderr: r.stderr };
}

/** A repository with password A (and, with `withB`, a second key under B), copied fresh for each stop. */
function template(name: string, withB: boolean): string {
  const repo = join(dir, name);
  expect(kscinc(['repo', 'init', repo, '--encrypt', '--kdf-n', '1024'], { env: env(A) }).code).toBe(0);
  if (withB) expect(kscinc(['key', 'add', '--repo', repo, '--kdf-n', '1024'], { env: env(A, B) }).code).toBe(0);
  return repo;
}

/** Runs `args` against a fresh copy of `tpl` stopped after each step; `check(copy, done)` after each. */
function everyStep(tpl: string, args: (repo: string) => string[], e: Record<string, string | undefined>, check: (repo: string, done: boolean) => void): number {
  for (let n = 0; n <= MAX_STEPS; n++) {
    const repo = `${tpl}-${n}`;
    rmSync(repo, { recursive: true, force: true });
    cpSync(tpl, repo, { recursive: true });
    const r = stoppedAfter(args(repo), n, e);
    check(repo, r.done);
    rmSync(repo, { recursive: true, force: true });
    if (r.done) return r.steps!;
  }
  throw new Error(`did not complete within ${MAX_STEPS} steps`);
}

describe('key management stopped after every step (§13.3 rule 4)', () => {
  it('repo init --encrypt: nothing, or a repository the password opens; a re-run of init completes', () => {
    let steps = -1;
    for (let n = 0; n <= MAX_STEPS && steps < 0; n++) {
      const repo = join(dir, `init-${n}`);
      const r = stoppedAfter(['repo', 'init', repo, '--encrypt', '--kdf-n', '1024'], n, env(A));
      if (r.done) steps = r.steps!;
      if (!opens(repo, A)) {
        expect(r.done, `step ${n}`).toBe(false);
        const again = kscinc(['repo', 'init', repo, '--encrypt', '--kdf-n', '1024'], { env: env(A) });
        expect(again.code, `step ${n}: ${again.stderr}`).toBe(0);
        expect(opens(repo, A), `step ${n}`).toBe(true);
      }
      const b = kscinc(['backups', '--repo', repo], { env: env(A) });
      expect(b.code, `step ${n}: ${b.stderr}`).toBe(0);
    }
    expect(steps).toBeGreaterThanOrEqual(2); // the key object, then the config
  });

  it('key passwd A → B: A or B opens after every stop; B only at the end', () => {
    const tpl = template('passwd', false);
    const steps = everyStep(
      tpl,
      (repo) => ['key', 'passwd', '--repo', repo, '--kdf-n', '1024'],
      env(A, B),
      (repo, done) => {
        const [a, b] = [opens(repo, A), opens(repo, B)];
        expect(a || b, `${repo}: neither password opens`).toBe(true);
        if (done) expect([a, b]).toEqual([false, true]);
      },
    );
    expect(steps).toBe(2); // the new key object, then the old one's delete
  });

  it('key add B: A opens after every stop; B too at the end', () => {
    const tpl = template('add', false);
    everyStep(
      tpl,
      (repo) => ['key', 'add', '--repo', repo, '--kdf-n', '1024'],
      env(A, B),
      (repo, done) => {
        expect(opens(repo, A), repo).toBe(true);
        if (done) expect(opens(repo, B), repo).toBe(true);
      },
    );
  });

  it("key remove (A's key, with B's password): B opens after every stop; A no longer at the end; the last key is refused", () => {
    const tpl = template('remove', true);
    const keyOfA = (repo: string): string => {
      const r = kscinc(['key', 'list', '--repo', repo, '--json'], { env: env(A) });
      return (JSON.parse(r.stdout) as { id: string; current: boolean }[]).find((k) => k.current)!.id;
    };
    const aId = keyOfA(tpl);
    everyStep(
      tpl,
      (repo) => ['key', 'remove', aId, '--repo', repo],
      env(B),
      (repo, done) => {
        expect(opens(repo, B), repo).toBe(true);
        if (done) expect(opens(repo, A), repo).toBe(false);
      },
    );
    // The last key: refused even with a key file (which needs no key object), and nothing changes.
    const repo = join(dir, 'last');
    const keyFile = join(dir, 'last.key');
    expect(kscinc(['repo', 'init', repo, '--encrypt', '--kdf-n', '1024', '--key-file', keyFile], { env: env(A) }).code).toBe(0);
    const [only] = keyIds(repo);
    const r = kscinc(['key', 'remove', only!, '--repo', repo, '--key-file', keyFile], { env: { KSCINC_PASSWORD_FILE: undefined } });
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/last key/);
    expect(keyIds(repo)).toEqual([only]);
    expect(opens(repo, A)).toBe(true);
  });
});
