/** Data flows one way: cli, supervisor, nbd, qmp → engines → image, repo → format/io/hash/crypto/compress/objstore/util/errors. A module never imports from a layer above. */
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { join, relative, dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, it, expect } from 'vitest';

const src = fileURLToPath(new URL('../src', import.meta.url));
const rank: Record<string, number> = {
  'errors.ts': 0,
  util: 0,
  format: 1,
  io: 1,
  hash: 1,
  crypto: 1,
  compress: 1,
  objstore: 1,
  image: 2,
  repo: 2,
  engines: 3,
  nbd: 4,
  qmp: 4,
  supervisor: 4,
  cli: 4,
  'index.ts': 5,
};

function files(dir: string): string[] {
  return readdirSync(dir).flatMap((f) => {
    const p = join(dir, f);
    return statSync(p).isDirectory() ? files(p) : p.endsWith('.ts') ? [p] : [];
  });
}

function layer(file: string): string {
  return relative(src, file).split('/')[0]!;
}

describe('layering', () => {
  it('every import points to the same or a lower layer', () => {
    const all = files(src);
    expect(all.length).toBeGreaterThan(10);
    const violations: string[] = [];
    for (const f of all) {
      const text = readFileSync(f, 'utf8');
      for (const m of text.matchAll(/(?:import|export)[^'"]*from\s+'(\.[^']+)'|import\('(\.[^']+)'\)/g)) {
        const target = resolve(dirname(f), (m[1] ?? m[2])!).replace(/\.js$/, '.ts');
        const from = layer(f);
        const to = layer(target);
        expect(rank[from], `unknown layer of ${f}`).toBeDefined();
        expect(rank[to], `unknown layer of ${target}`).toBeDefined();
        if (rank[to]! > rank[from]!) violations.push(`${relative(src, f)} imports ${relative(src, target)}`);
      }
    }
    expect(violations).toEqual([]);
  });
});
