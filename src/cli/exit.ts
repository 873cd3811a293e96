/**
 * Exit statuses of the kscinc command, one table for every command (shown by --help, in the README and in docs/cli.md).
 * A result a command reports (corruption found, an RPO missed) never shares a number with "the command
 * line was wrong" (64, EX_USAGE from sysexits.h) or "it failed" (1).
 */
export const EXIT = {
  OK: 0,
  /** The command failed; the reason is the one line on stderr. */
  ERROR: 1,
  /** check: the image is corrupt (as qemu-img check). */
  CORRUPT: 2,
  /** check: leaked space only (not with --repair); verify: damaged or missing repository objects. */
  LEAKS_OR_DAMAGE: 3,
  /** schedule status: a job's newest backup is older than its rpo. */
  RPO_MISSED: 4,
  /** schedule status: a job's last run failed (and every rpo is met). */
  LAST_RUN_FAILED: 5,
  /** check: the file is not a ksc_inc image (qemu-img check uses 63 for a format it cannot check). */
  NOT_KSC: 63,
  /** The command line could not be parsed: unknown command or option, missing or malformed argument. */
  USAGE: 64,
  /**
   * Interrupted by SIGINT (Ctrl-C); a file being made was removed. SIGTERM: 143. Also when a file operation
   * never returns (a hung NFS server): the exit watchdog ends the process with it (src/cli/program.ts); without
   * the addon (KSCINC_NO_NATIVE=1) the process is then ended by the signal itself (the shell's 130 / 143; a
   * parent process sees the signal, not an exit code).
   */
  INTERRUPTED: 130,
  TERMINATED: 143,
} as const;

/** Statuses every command may end with. */
export const COMMON_CODES: [number, string][] = [
  [EXIT.OK, 'success'],
  [EXIT.ERROR, 'failed (one line on stderr says why; --json: also {"error": …} on stdout)'],
  [EXIT.USAGE, 'usage error: unknown command or option, missing or malformed argument'],
  [EXIT.INTERRUPTED, 'interrupted by Ctrl-C (SIGINT; 143 for SIGTERM): a file being made is removed'],
];

/** Statuses particular to a command (by its full name, e.g. "schedule status"). */
export const COMMAND_CODES: Record<string, [number, string][]> = {
  check: [
    [EXIT.CORRUPT, 'corruption found'],
    [EXIT.LEAKS_OR_DAMAGE, 'leaked space only (repairable with --repair)'],
    [EXIT.NOT_KSC, 'not a ksc_inc image (raw, or another format): nothing to check'],
  ],
  verify: [[EXIT.LEAKS_OR_DAMAGE, 'damaged or missing objects (named on stdout with the backups they break)']],
  backups: [[EXIT.ERROR, 'also when a manifest is damaged (the others are listed)']],
  'schedule status': [
    [EXIT.RPO_MISSED, "some job's newest backup is older than its rpo"],
    [EXIT.LAST_RUN_FAILED, "some job's last run failed (every rpo met)"],
  ],
  'schedule run': [[EXIT.ERROR, 'an on-shutdown job failed or was left unfinished at the shutdown timeout']],
  serve: [[EXIT.OK, 'also after SIGTERM or SIGINT, once in-flight requests are answered and the images closed']],
};

/** The "Exit status:" help text of a command. */
export function exitHelp(name: string | null): string {
  const rows = [...COMMON_CODES];
  for (const [code, text] of name ? (COMMAND_CODES[name] ?? []) : Object.entries(COMMAND_CODES).flatMap(([cmd, l]) => l.map(([c, t]) => [c, `${cmd}: ${t}`] as [number, string]))) {
    rows.push([code, text]);
  }
  rows.sort((a, b) => a[0] - b[0]);
  return `\nExit status:\n${rows.map(([c, t]) => `  ${String(c).padStart(3)}  ${t}`).join('\n')}\n`;
}
