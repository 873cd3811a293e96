/**
 * Reading a test vector from the spec text (formats/*.md): a fenced block ```NAME of `key value…` lines and
 * `bytes OFFSET HEX` lines, as ksc_inc.md §12.3 (vectors-repo-backing, vectors-local-base) and §12.4
 * (vectors-origin) write them. The spec is read each call: the tests check what the spec says today.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Header } from '../../src/format/header.js';
import { ROOT } from './corrupt.js';

export interface SpecVector {
  /** Every `key value…` line (blank and # lines skipped), value as written. */
  fields: Map<string, string>;
  /** The `bytes OFFSET HEX` lines, in order. */
  bytes: { offset: number; hex: string }[];
}

export function specVector(name: string, file = 'ksc_inc.md'): SpecVector {
  const spec = readFileSync(join(ROOT, 'formats', file), 'utf8');
  const m = new RegExp('```' + name + '\\n([\\s\\S]*?)\\n```').exec(spec);
  if (!m) throw new Error(`formats/${file} has no \`\`\`${name} block`);
  const fields = new Map<string, string>();
  const bytes: { offset: number; hex: string }[] = [];
  for (const line of m[1]!.split('\n')) {
    if (line.trim() === '' || line.startsWith('#')) continue;
    const [k, ...rest] = line.trim().split(/\s+/);
    if (k === 'bytes') bytes.push({ offset: Number(rest[0]), hex: rest[1]! });
    else fields.set(k!, rest.join(' '));
  }
  return { fields, bytes };
}

/** A UUID field (with or without dashes) as its 16 bytes. */
export const uuidBytes = (s: string): Buffer => Buffer.from(s.replace(/-/g, ''), 'hex');

/** The header the §12.3/§12.4 vectors are laid into: a 1 GiB image of 64 KiB blocks, no backing; callers add theirs. */
export function vectorHeader(diskUuid: Buffer): Omit<Header, 'version' | 'mapPageBits' | 'backingNameLength'> {
  return {
    generation: 1,
    incompatible: 0n,
    compatible: 0n,
    autoclear: 0n,
    diskUuid,
    virtualSize: 1 << 30,
    blockBits: 16,
    directoryOffset: 8192,
    directoryEntries: 4,
    intentBits: 18,
    intentOffset: 12288,
    intentWords: 64,
    bitmapSlots: 64,
    bitmapDirOffset: 16384,
    freeListOffset: 0,
    freeListEntries: 0,
    backingFormat: 0,
    backingName: '',
  };
}
