/** formats/schedule.md §4: the example schedule file parses, its next runs are the spec's, the example state reads back. */
import { describe, expect, it } from 'vitest';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseConfigText } from '../../src/engines/schedule/config.js';
import { nextRuns } from '../../src/engines/schedule/when.js';
import { readState } from '../../src/engines/schedule/state.js';
import { ROOT } from '../helpers/corrupt.js';
import { tempDir } from '../helpers/tmp.js';

const spec = readFileSync(`${ROOT}/formats/schedule.md`, 'utf8');
function block(name: string): string {
  const m = new RegExp('```' + name + '\\n([\\s\\S]*?)```').exec(spec);
  if (!m) throw new Error(`formats/schedule.md has no ${name} block`);
  return m[1]!;
}

describe('formats/schedule.md examples', () => {
  it('the example schedule file parses and gives the next runs the spec lists', () => {
    const cfg = parseConfigText(block('schedule-example'), '/etc/kscinc/schedule.yaml');
    expect(cfg.jobs.map((j) => j.name)).toEqual(['web1', 'month-end']);
    expect(cfg.jobs[0]!.images).toEqual(['/etc/kscinc/disks/web1.ksc']);
    expect(cfg.jobs[0]!.timezone).toBe('Europe/Berlin');
    expect(cfg.jobs[0]!.rpoMs).toBe(6 * 3600 * 1000);
    expect(cfg.jobs[1]!.timezone).toBe('UTC');
    const from = Date.parse('2027-01-25T00:00:00Z');
    const lines = block('schedule-next').trim().split('\n');
    expect(lines.length).toBe(2);
    for (const line of lines) {
      const [name, ...runs] = line.split(' ');
      const job = cfg.jobs.find((j) => j.name === name)!;
      expect(nextRuns(job.when, job.timezone, from, runs.length, from).map((t) => new Date(t).toISOString())).toEqual(runs);
    }
  });

  it('the replication example (§1.1) parses into the target options of replicate once', () => {
    const [job] = parseConfigText(block('schedule-replicate-example'), '/etc/kscinc/schedule.yaml').jobs;
    expect(job!.replicate).toBe('nbds://10.0.0.2:10809/web1');
    expect(job!.images).toEqual(['/etc/kscinc/disks/web1.ksc']);
    expect(job!.target).toEqual({ token: '0123456789abcdef0123456789abcdef', tlsPsk: '/etc/kscinc/keys.psk', tlsPskUser: 'web1-source', bandwidth: '50M' });
    expect(job!.rpoMs).toBe(30 * 60 * 1000);
  });

  it('the example state file reads back with every member', async () => {
    const path = join(tempDir(), 's.yaml.state.json');
    const text = block('state-example').trim();
    writeFileSync(path, text);
    const st = await readState(path);
    expect(st).toEqual(JSON.parse(text));
    writeFileSync(path, text.replace('"version":1', '"version":2'));
    await expect(readState(path)).rejects.toMatchObject({ code: 'KSC_E_CORRUPT' });
  });
});
