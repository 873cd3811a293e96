import { type SpawnOptions, spawn } from 'node:child_process';

/** How a child process ended: its code or signal, its stderr, and whether it had to be killed after the timeout. */
export type Ran = { code: number | null; signal: NodeJS.Signals | null; stderr: string; hung: boolean };

/** Runs node with `args` (stdout ignored, stderr kept); SIGKILLs it after `timeoutMs` and says so. */
export function runNode(args: string[], timeoutMs: number, env?: SpawnOptions['env']): Promise<Ran> {
  return new Promise((resolve) => {
    const c = spawn(process.execPath, args, { stdio: ['ignore', 'ignore', 'pipe'], ...(env ? { env } : {}) });
    let stderr = '';
    let hung = false;
    c.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
    const t = setTimeout(() => {
      hung = true;
      c.kill('SIGKILL');
    }, timeoutMs);
    c.on('close', (code, signal) => {
      clearTimeout(t);
      resolve({ code, signal, stderr, hung });
    });
  });
}
