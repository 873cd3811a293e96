/**
 * ObjectStore.getUpTo (session 22's bound on the small objects anyone who can write the storage can plant,
 * objstore/small-object.ts), review of session 23. A folder store opened whatever was under the key and read
 * it: a fifo read as an empty object, a symlink to /dev/zero as 64 KiB + 1 of zeros, a directory as a missing
 * object, a socket as an I/O error. Only a regular file is an object: the others are KSC_E_CORRUPT naming the
 * key. The S3 store took the whole answer and only then compared it with the Range asked for: a gateway that
 * ignores the Range (or a hostile one) made it read the whole object; it must stop after max + 1 bytes.
 */
import { execFileSync } from 'node:child_process';
import { mkdirSync, symlinkSync, unlinkSync } from 'node:fs';
import { createServer as createHttpServer } from 'node:http';
import { createServer as createNetServer, type Server } from 'node:net';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { FsStore, S3Store } from '../../src/objstore/index.js';
import { MAX_SMALL_OBJECT } from '../../src/objstore/small-object.js';
import { tempDir } from '../helpers/tmp.js';

describe('FsStore.getUpTo: only a regular file under a key is read', () => {
  it('a fifo, a symlink to /dev/zero, a directory and a socket under the key: KSC_E_CORRUPT naming the key and its kind', async () => {
    const root = tempDir('kscinc-getupto-kinds-');
    const store = await FsStore.open(root, { create: true });
    let sock: Server | undefined;
    try {
      await store.put('locks/plain', Buffer.from('{"host":"h"}'));
      expect((await store.getUpTo('locks/plain', MAX_SMALL_OBJECT + 1)).toString()).toBe('{"host":"h"}');
      execFileSync('mkfifo', [join(root, 'locks', 'fifo')]);
      symlinkSync('/dev/zero', join(root, 'locks', 'zero'));
      mkdirSync(join(root, 'locks', 'dir'));
      sock = createNetServer();
      await new Promise<void>((ok) => sock!.listen(join(root, 'locks', 'sock'), ok));
      const cases = [
        ['locks/fifo', 'a fifo'],
        ['locks/zero', 'a character device'],
        ['locks/dir', 'a directory'],
        ['locks/sock', 'a socket( or a device without a driver)?'],
      ] as const;
      const seen: string[] = [];
      for (const [key] of cases) {
        seen.push(
          await store.getUpTo(key, MAX_SMALL_OBJECT + 1).then(
            (b) => `read ${b.length} bytes`,
            (e: { code?: string; message: string }) => `${e.code}: ${e.message}`,
          ),
        );
      }
      console.log(`getUpTo of non-regular files:\n${seen.join('\n')}`);
      cases.forEach(([key, kind], i) => expect(seen[i], key).toMatch(new RegExp(`^KSC_E_CORRUPT: .*object ${key} is ${kind}, not a regular file`)));
    } finally {
      await new Promise((ok) => (sock ? sock.close(ok) : ok(undefined)));
      unlinkSync(join(root, 'locks', 'zero'));
      await store.close();
    }
  });
});

describe('S3Store.getUpTo against a gateway that ignores the Range', () => {
  it('KSC_E_CORRUPT after at most max + 1 bytes taken: the connection is dropped, not the whole object read', async () => {
    // A gateway answering every GET with 64 MiB (200, no Content-Range), counting what it managed to send.
    const TOTAL = 64 * 1024 * 1024;
    let sent = 0;
    let ranges: string[] = [];
    const server = createHttpServer((req, res) => {
      ranges.push(String(req.headers.range));
      res.writeHead(200, { 'content-length': String(TOTAL), 'content-type': 'application/octet-stream' });
      const chunk = Buffer.alloc(64 * 1024, 0x41);
      const pump = (): void => {
        while (sent < TOTAL && !res.destroyed) {
          sent += chunk.length;
          if (!res.write(chunk)) return void res.once('drain', pump);
        }
        if (sent >= TOTAL) res.end();
      };
      pump();
    });
    await new Promise<void>((ok) => server.listen(0, '127.0.0.1', ok));
    const port = (server.address() as { port: number }).port;
    const store = await S3Store.open({ endpoint: `http://127.0.0.1:${port}`, region: 'us-east-1', bucket: 'bucket', prefix: 'p', accessKey: 'k', secretKey: 's' }, { check: false, create: false });
    try {
      const got = await store.getUpTo('locks/x', MAX_SMALL_OBJECT + 1).then(
        (b) => `read ${b.length} bytes`,
        (e: { code?: string; message: string }) => `${e.code}: ${e.message}`,
      );
      console.log(`ranges asked: ${ranges.join(', ')}; the gateway sent ${sent} bytes; ${got}`);
      expect(ranges[0]).toBe(`bytes=0-${MAX_SMALL_OBJECT}`);
      expect(got).toMatch(/^KSC_E_CORRUPT: .*locks\/x/);
      // Socket buffers hold a few MiB at most; the whole answer is 64 MiB.
      expect(sent, 'bytes the gateway could send before the reader hung up').toBeLessThan(16 * 1024 * 1024);
    } finally {
      ranges = [];
      await store.close();
      server.closeAllConnections();
      await new Promise((ok) => server.close(ok));
    }
  }, 60_000);
});
