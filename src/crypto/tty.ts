/**
 * A password typed on the terminal (formats/repository.md §13.3 rule 3): asked on standard error, read from
 * standard input in raw mode so nothing is echoed. Only when standard input is a TTY and no password
 * variable or key file was given; elsewhere (a pipe, a service, the scheduler) there is no prompt, and the
 * caller's error names the variables to set.
 */
import { KscError } from '../errors.js';

/** Whether a password can be asked for: standard input is a terminal. */
export function canPrompt(): boolean {
  return process.stdin.isTTY === true && typeof process.stdin.setRawMode === 'function';
}

/**
 * Asks `prompt` and reads one line without echo (Enter ends it; Backspace and Ctrl-U edit; Ctrl-C or
 * Ctrl-D on an empty line abort with KSC_E_INVALID).
 */
export function readHidden(prompt: string): Promise<Buffer> {
  const input = process.stdin;
  const bytes: number[] = [];
  return new Promise((resolve, reject) => {
    const finish = (err: Error | null): void => {
      input.off('data', onData);
      input.setRawMode(false);
      input.pause();
      process.stderr.write('\n');
      const out = Buffer.from(bytes);
      bytes.fill(0);
      if (err) reject(err);
      else resolve(out);
    };
    const onData = (d: Buffer): void => {
      for (const c of d) {
        if (c === 0x0d || c === 0x0a) return finish(null);
        if (c === 0x03 || (c === 0x04 && bytes.length === 0)) return finish(new KscError('KSC_E_INVALID', 'no password given (the prompt was interrupted)'));
        if (c === 0x15) bytes.length = 0;
        else if (c === 0x7f || c === 0x08) {
          // One character back: its UTF-8 continuation bytes, then its first byte.
          while (bytes.length > 0 && (bytes[bytes.length - 1]! & 0xc0) === 0x80) bytes.pop();
          bytes.pop();
        } else if (c >= 0x20 || c === 0x09) bytes.push(c);
      }
    };
    // Echo off BEFORE the prompt shows: a password typed as soon as the prompt appears must find the
    // terminal already raw, or its line discipline echoes it (found under load in CI).
    input.setRawMode(true);
    process.stderr.write(prompt);
    testPromptDelay();
    input.on('data', onData);
    input.resume();
  });
}

/**
 * Test hook: KSCINC_TEST_PROMPT_DELAY_MS holds the process (synchronously) right after the prompt is written,
 * so a test can type while the prompt shows and before input is read (test/crypto/password-tty.test.ts).
 */
function testPromptDelay(): void {
  const ms = Number(process.env.KSCINC_TEST_PROMPT_DELAY_MS ?? 0);
  if (ms > 0) Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, Math.min(ms, 10_000));
}

/** A new password typed twice (init, key add, key passwd); KSC_E_INVALID when the two differ or it is empty. */
export async function readNewPassword(what: string): Promise<Buffer> {
  const a = await readHidden(`${what}: `);
  const b = await readHidden(`${what} again: `);
  const same = a.equals(b);
  b.fill(0);
  if (!same) throw new KscError('KSC_E_INVALID', 'the two passwords typed differ; nothing was changed');
  if (a.length === 0) throw new KscError('KSC_E_INVALID', 'the new password is empty');
  return a;
}
