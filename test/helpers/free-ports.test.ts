/**
 * test/helpers/s3.ts freePorts: ports for servers that bind them later (the S3 cluster's gateway and monitor,
 * a QEMU's NBD or QMP port). A port from the kernel's ephemeral range may be handed to another process's
 * listen(0) or outgoing connection meanwhile (session 21: radosgw "failed to bind address 127.0.0.1:37155:
 * Address already in use" three times, so every S3 test of that run failed), so they come from outside it.
 */
import { createServer } from 'node:net';
import { describe, expect, it } from 'vitest';
import { ephemeralPorts, freePorts } from './s3.js';

describe('freePorts', () => {
  it('gives distinct ports outside the ephemeral range, each free to bind', async () => {
    const [lo, hi] = ephemeralPorts();
    const ports = await freePorts(16);
    expect(ports).toHaveLength(16);
    expect(new Set(ports).size).toBe(16);
    for (const p of ports) expect(p < lo || p > hi, `${p} outside ${lo}–${hi}`).toBe(true);
    for (const p of ports) {
      const s = createServer();
      await new Promise<void>((resolve, reject) => {
        s.once('error', reject);
        s.listen(p, '127.0.0.1', resolve);
      });
      await new Promise((r) => s.close(r));
    }
  });
});
