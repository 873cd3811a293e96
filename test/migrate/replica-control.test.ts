/**
 * The replicate-* and migrate-* control requests share their checks (src/cli/migrate-control.ts parseOp,
 * checkTargetMembers; formats/control.md §7, formats/migrate.md §6): the same bad member gets the same
 * error from both, and each keeps its own members.
 */
import { describe, expect, it } from 'vitest';
import { parseMigrateRequest } from '../../src/cli/migrate-control.js';
import { parseReplicateRequest } from '../../src/cli/replicate-control.js';

const start = { to: 'nbd://127.0.0.1:1/x' };
const line = (o: object): string => JSON.stringify(o);

describe('control requests of migrate and replicate', () => {
  it('refuse the same bad members with the same messages', () => {
    for (const bad of [{ token: 'AB' }, { baseFingerprint: 'v2' }, { bandwidth: 10 }, { connections: 17 }, { compress: 'yes' }, { to: '' }]) {
      const m = (): unknown => parseMigrateRequest(line({ op: 'migrate-start', ...start, ...bad }));
      const r = (): unknown => parseReplicateRequest(line({ op: 'replicate-once', ...start, ...bad }));
      expect(m).toThrow(/bad control request: member/);
      let msg = '';
      try {
        m();
      } catch (e) {
        msg = (e as Error).message;
      }
      expect(r).toThrow(msg);
    }
  });

  it('keep their own members and ops', () => {
    expect(parseReplicateRequest(line({ op: 'replicate-start', ...start, everyMs: 5000 }))).toMatchObject({ everyMs: 5000 });
    expect(() => parseReplicateRequest(line({ op: 'replicate-start', ...start }))).toThrow(/everyMs/);
    expect(() => parseReplicateRequest(line({ op: 'replicate-once', ...start, repo: 'r' }))).toThrow(/unknown member "repo"/);
    expect(parseMigrateRequest(line({ op: 'migrate-start', ...start, repo: 'r' }))).toMatchObject({ repo: 'r' });
    expect(() => parseMigrateRequest(line({ op: 'replicate-stop' }))).toThrow(/unknown op/);
    expect(parseReplicateRequest(line({ op: 'replicate-stop', drop: true }))).toMatchObject({ drop: true });
    expect(() => parseReplicateRequest(line({ op: 'replicate-stop', drop: 1 }))).toThrow(/drop/);
  });
});
