/** A raw exchange with a control socket (formats/control.md): send one line (or none), read every JSON line until it closes. */
import { createConnection } from 'node:net';

export function exchange(path: string, line: string | null): Promise<Record<string, unknown>[]> {
  return new Promise((resolve, reject) => {
    const sock = createConnection(path);
    let buf = '';
    sock.on('connect', () => {
      if (line !== null) sock.write(line + '\n');
    });
    sock.on('data', (d) => (buf += d.toString()));
    sock.on('error', reject);
    sock.on('close', () =>
      resolve(
        buf
          .split('\n')
          .filter(Boolean)
          .map((l) => JSON.parse(l) as Record<string, unknown>),
      ),
    );
  });
}
