/**
 * Progress bars for long commands, drawn on stderr when it is a terminal (never in a pipe, a log or with
 * --quiet). One line, redrawn at most ten times a second:
 *   convert [##########..........]  50% 512 MiB / 1.00 GiB, 210 MiB/s, 3 s left
 * Sizes are human-readable; counts (blocks, chunks) print as numbers. The rate and the time left appear only
 * once there is something to base them on (never "NaN" or "Infinity"); progress never goes backwards
 * (concurrent workers report out of order); `stop` erases the line.
 */
import { formatSize } from '../util/size.js';
import { stderrIfTerminal } from './stdio.js';

export type ProgressUnit = 'bytes' | 'blocks' | 'chunks' | 'steps';

export interface ProgressSink {
  isTTY?: boolean;
  columns?: number;
  write(text: string): unknown;
}

export interface Progress {
  update(done: number, total: number): void;
  stop(): void;
}

const NONE: Progress = { update: () => undefined, stop: () => undefined };

/** Whether bars are drawn (the CLI turns them off for --quiet and --json). */
let enabled = true;
export function setProgressEnabled(on: boolean): void {
  enabled = on;
}

/** "1:05:09", "2:03", "7 s". */
export function formatEta(seconds: number): string {
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const ss = String(s % 60).padStart(2, '0');
  return h > 0 ? `${h}:${String(m).padStart(2, '0')}:${ss}` : `${m}:${ss}`;
}

function amount(n: number, unit: ProgressUnit): string {
  return unit === 'bytes' ? formatSize(n) : `${n}`;
}

/** The text of one bar (pure: tested on its own). `elapsedMs` is the time since the first update. */
export function renderBar(label: string, done: number, total: number, unit: ProgressUnit, elapsedMs: number, width = 20): string {
  const d = Math.max(0, Math.min(done, total));
  const frac = total > 0 ? d / total : 1;
  const filled = Math.round(frac * width);
  const pct = `${Math.floor(frac * 100)}`.padStart(3);
  let text = `${label} [${'#'.repeat(filled)}${'.'.repeat(width - filled)}] ${pct}% ${amount(d, unit)} / ${amount(total, unit)}${unit === 'bytes' ? '' : ` ${unit}`}`;
  if (elapsedMs >= 1000 && d > 0) {
    const perSec = (d / elapsedMs) * 1000;
    text += unit === 'bytes' ? `, ${formatSize(Math.round(perSec))}/s` : `, ${Math.round(perSec)}/s`;
    if (d < total) text += `, ${formatEta((total - d) / perSec)} left`;
  }
  return text;
}

/**
 * A progress reporter for `label`: a bar on `sink` (default stderr) when it is a terminal and bars are
 * enabled, else nothing. `now` is injectable for tests.
 */
export function progressBar(label: string, unit: ProgressUnit = 'bytes', to?: ProgressSink, now: () => number = () => Date.now()): Progress {
  if (!enabled) return NONE;
  const sink = to ?? stderrIfTerminal(); // stderr is not made for nothing (src/cli/stdio.ts)
  if (!sink?.isTTY) return NONE;
  let start = -1;
  let lastDraw = -Infinity;
  let best = 0;
  let shown = 0; // length of the line on screen
  const draw = (done: number, total: number): void => {
    const cols = Math.max(40, (sink.columns || 80) - 1); // a pseudo-terminal may say 0
    const line = renderBar(label, done, total, unit, now() - start).slice(0, cols);
    sink.write(`\r${line}${' '.repeat(Math.max(0, shown - line.length))}`);
    shown = line.length;
  };
  return {
    update(done, total) {
      const t = now();
      if (start < 0) start = t;
      best = Math.max(best, done);
      if (t - lastDraw < 100 && best < total) return;
      lastDraw = t;
      draw(best, total);
    },
    stop() {
      if (shown > 0) sink.write(`\r${' '.repeat(shown)}\r`);
      shown = 0;
    },
  };
}
