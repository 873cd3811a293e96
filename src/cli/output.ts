/** Rendering helpers shared by the commands: JSON or text, and a progress bar on a TTY. */
import { KscError } from '../errors.js';
import type { ImageFormat } from '../image/open.js';
import { formatSize } from '../util/size.js';
import { writeOut } from './stdio.js';

export function printJson(value: unknown): void {
  writeOut(`${JSON.stringify(value, null, 2)}\n`);
}

export function println(line = ''): void {
  writeOut(`${line}\n`);
}

export { formatSize };

export { progressBar, type Progress, type ProgressUnit } from './progress.js';

/** The one spelling of a format the CLI prints and documents (ksc_inc is the format's name in the spec). */
export function formatName(f: ImageFormat): string {
  return f === 'ksc_inc' ? 'kscinc' : f;
}

export function parseFormat(text: string): ImageFormat {
  const t = text.toLowerCase();
  if (t === 'raw') return 'raw';
  if (t === 'kscinc' || t === 'ksc_inc' || t === 'ksc') return 'ksc_inc';
  throw new KscError('KSC_E_INVALID', `unknown format "${text}" (use raw or kscinc)`);
}
