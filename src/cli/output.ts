/** Rendering helpers shared by the commands: JSON or text, and a progress bar on a TTY. */
import { createRequire } from 'node:module';
import type * as CliProgress from 'cli-progress';
import { formatSize } from '../util/size.js';

export function printJson(value: unknown): void {
  process.stdout.write(`${JSON.stringify(value, null, 2)}\n`);
}

export function println(line = ''): void {
  process.stdout.write(`${line}\n`);
}

export { formatSize };

/** A progress callback that draws a bar on stderr when it is a TTY, and does nothing otherwise. */
export function progressBar(label: string): { update: (done: number, total: number) => void; stop: () => void } {
  if (!process.stderr.isTTY) return { update: () => undefined, stop: () => undefined };
  // Loaded only when a bar is drawn: every command pays for what it imports at start-up.
  const cliProgress = createRequire(import.meta.url)('cli-progress') as typeof CliProgress;
  const bar = new cliProgress.SingleBar(
    { stream: process.stderr, format: `${label} [{bar}] {percentage}% | {value}/{total} MiB | {eta_formatted}`, hideCursor: true, clearOnComplete: true },
    cliProgress.Presets.shades_classic,
  );
  let started = false;
  return {
    update(done, total) {
      const mib = (n: number): number => Math.round(n / 1048576);
      if (!started) bar.start(mib(total), 0), (started = true);
      bar.update(mib(done));
    },
    stop() {
      if (started) bar.stop();
    },
  };
}
