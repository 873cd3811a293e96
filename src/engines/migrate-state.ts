/**
 * The persistent state of a migration in the source image (formats/migrate.md §10): the migration bitmap
 * (`kscinc-migrate`, enabled: every change since the migration started that is not yet known durable at the
 * destination), the round's bits (`kscinc-migrate~frozen`, disabled: what the running round sends), and a
 * record naming the destination and how far the destination durably holds the current pass:
 * `kscinc-migrate#ID@STAGE` + cursor — an empty, disabled bitmap used as a name, like the backup's token
 * records. STAGE `f`: the first pass (the ranges above the base, in offset order); `r`: a round over the
 * frozen bits. CURSOR (hex): every range of that pass below it was acknowledged and FLUSHed by the
 * destination. A cursor moves only forwards within a pass and is reset (record `r0`) before a round freezes.
 *
 * Invariant: at every moment, every byte where the destination may differ from the source is in the
 * migration bitmap, or in the frozen bits at or above the cursor (stage r), or in the ranges above the base
 * at or above the cursor (stage f: a range below it that changed since is in the migration bitmap).
 */
import { migrateKillPoint } from '../util/killpoint.js';
import type { DirtyBitmaps } from '../image/capabilities.js';

export const MIGRATE_BITMAP = 'kscinc-migrate';
export const MIGRATE_FROZEN = 'kscinc-migrate~frozen';
const RECORD_PREFIX = 'kscinc-migrate#';
const RECORD = /^kscinc-migrate#([0-9a-f]{32})@([fr])([0-9a-f]{1,13})$/;

export type Stage = 'f' | 'r';

export interface Progress {
  /** The destination's incoming id (formats/migrate.md §5). */
  id: string;
  stage: Stage;
  cursor: number;
}

const recordName = (p: Progress): string => `${RECORD_PREFIX}${p.id}@${p.stage}${p.cursor.toString(16)}`;

/** The records now in the image (normally one; two after a crash inside setProgress). */
function records(bitmaps: DirtyBitmaps): { name: string; p: Progress }[] {
  return bitmaps.bitmapNames().flatMap((name) => {
    const m = RECORD.exec(name);
    return m ? [{ name, p: { id: m[1]!, stage: m[2] as Stage, cursor: parseInt(m[3]!, 16) } }] : [];
  });
}

/** Every record-like name, well formed or not (all of them go when the state is removed). */
const recordNames = (bitmaps: DirtyBitmaps): string[] => bitmaps.bitmapNames().filter((n) => n.startsWith(RECORD_PREFIX));

/**
 * The state a rerun can resume from, or null: the migration bitmap and exactly one destination id. With two
 * records of one id (a crash while moving the cursor) the one behind wins: the other may not be durable.
 */
export function resumable(bitmaps: DirtyBitmaps): Progress | null {
  if (!bitmaps.hasBitmap(MIGRATE_BITMAP)) return null;
  const rs = records(bitmaps);
  if (rs.length === 0 || rs.some((r) => r.p.id !== rs[0]!.p.id)) return null;
  const stages = new Set(rs.map((r) => r.p.stage));
  // f → r0 and r → r0 are the only moves with two records; an `f` beside an `r` means the first pass may not be done.
  if (stages.size > 1) return { ...rs.find((r) => r.p.stage === 'f')!.p };
  return rs.reduce((a, b) => (b.p.cursor < a.p.cursor ? b : a)).p;
}

/** Records `p` (one management step: the new record, then the old ones go). */
export async function setProgress(bitmaps: DirtyBitmaps, p: Progress): Promise<void> {
  const name = recordName(p);
  const old = recordNames(bitmaps).filter((n) => n !== name);
  if (old.length === 0 && bitmaps.hasBitmap(name)) return;
  await bitmaps.updateBitmaps(bitmaps.hasBitmap(name) ? [] : [name], old);
}

/**
 * Removes the whole state, the record first (so that a crash part way never leaves a state that looks
 * resumable with bits missing), then the frozen bits, then the migration bitmap. `why` names the kill
 * points (`WHY-removed-N` after the N-th removal).
 */
export async function removeState(bitmaps: DirtyBitmaps, why: string): Promise<void> {
  let n = 0;
  const recs = recordNames(bitmaps);
  if (recs.length > 0) {
    await bitmaps.updateBitmaps([], recs);
    migrateKillPoint(`${why}-removed-${++n}`);
  }
  for (const b of [MIGRATE_FROZEN, MIGRATE_BITMAP]) {
    if (!bitmaps.hasBitmap(b)) continue;
    await bitmaps.removeBitmap(b);
    migrateKillPoint(`${why}-removed-${++n}`);
  }
}
