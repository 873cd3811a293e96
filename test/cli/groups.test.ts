/**
 * The CLI loads only the command group a run names (src/cli/program.ts COMMAND_GROUPS): the table must say
 * exactly which top-level commands each group's module registers, or a command would be "unknown".
 */
import { describe, expect, it } from 'vitest';
import { COMMAND_GROUPS, buildProgram, endsWithItsAction, groupFor, versionOnly } from '../../src/cli/program.js';

describe('CLI command groups', () => {
  it('each group registers exactly the commands the table names, and all groups together every command once', async () => {
    const seen: string[] = [];
    for (const [name, g] of Object.entries(COMMAND_GROUPS)) {
      const p = await buildProgram(name);
      const cmds = p.commands.map((c) => c.name());
      expect(cmds.sort(), `group ${name}`).toEqual([...g.commands].sort());
      seen.push(...cmds);
    }
    const all = (await buildProgram()).commands.map((c) => c.name());
    expect(all.sort()).toEqual(seen.sort());
    expect(new Set(all).size).toBe(all.length);
  });

  it('finds the group from the first operand; help, options only and unknown words load everything', () => {
    const argv = (...a: string[]): string[] => ['node', 'kscinc', ...a];
    expect(groupFor(argv('backup', 'disk.ksc', '--repo', 'r'))).toBe('backup');
    expect(groupFor(argv('--debug', 'restore', 'latest', 'x'))).toBe('backup');
    expect(groupFor(argv('repo', 'init', 'r'))).toBe('backup');
    expect(groupFor(argv('bitmap', 'add', 'a', 'b'))).toBe('bitmap');
    expect(groupFor(argv('create', 'x', '--size', '1G'))).toBe('image');
    expect(groupFor(argv('schedule', 'next'))).toBe('schedule');
    expect(groupFor(argv('serve', 'x'))).toBe('serve');
    expect(groupFor(argv('read', 'x', '0', '1'))).toBe('io');
    expect(groupFor(argv('help', 'backup'))).toBeNull();
    expect(groupFor(argv('--help'))).toBeNull();
    expect(groupFor(argv('--version'))).toBeNull();
    expect(groupFor(argv('frobnicate'))).toBeNull();
    expect(groupFor(argv())).toBeNull();
  });

  it('the commands that end with their action are declared with their group: backup only, never its help', () => {
    const argv = (...a: string[]): string[] => ['node', 'kscinc', ...a];
    const declared = Object.entries(COMMAND_GROUPS).flatMap(([name, g]) => (g.endsWithAction ?? []).map((c) => `${name}:${c}`));
    expect(declared).toEqual(['backup:backup']);
    for (const [name, g] of Object.entries(COMMAND_GROUPS)) for (const c of g.endsWithAction ?? []) expect(g.commands, `group ${name}`).toContain(c);
    expect(endsWithItsAction(argv('backup', 'disk.ksc', '--repo', 'r'))).toBe(true);
    expect(endsWithItsAction(argv('--quiet', 'backup', 'disk.ksc', '--repo', 'r'))).toBe(true);
    for (const a of [['backup', '--help'], ['backup', '-h'], ['help', 'backup'], ['restore', 'latest', 'x'], ['serve', 'x'], ['--version'], []]) {
      expect(endsWithItsAction(argv(...a)), a.join(' ')).toBe(false);
    }
  });

  it('the groups that handle SIGINT and SIGTERM themselves are the server and the daemon', () => {
    const owning = Object.entries(COMMAND_GROUPS).flatMap(([name, g]) => (g.ownsSignals === true ? [name] : []));
    expect(owning).toEqual(['serve', 'schedule']);
  });

  it('a version query alone loads no group; with a command or help it does', async () => {
    const argv = (...a: string[]): string[] => ['node', 'kscinc', ...a];
    expect([versionOnly(argv('--version')), versionOnly(argv('-V')), versionOnly(argv('--debug', '-V'))]).toEqual([true, true, true]);
    expect([versionOnly(argv()), versionOnly(argv('--help', '--version')), versionOnly(argv('-h', '-V')), versionOnly(argv('info', '--version'))]).toEqual([false, false, false, false]);
    expect((await buildProgram(null, { commands: false })).commands).toEqual([]);
  });
});
