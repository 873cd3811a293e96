/** handover-run.ts: which requests buffered in a TLS connection's reader are run at a handover, and its bounds. */
import { describe, expect, it } from 'vitest';
import { completeRequests } from '../../src/nbd/handover-run.js';
import { CMD, encodeRequest } from '../../src/nbd/wire.js';

const req = (type: number, length: number, payload = 0): Buffer => Buffer.concat([encodeRequest({ flags: 0, type, cookie: 1n, offset: 0n, length }), Buffer.alloc(payload)]);

describe('completeRequests', () => {
  it('takes whole requests, stops before a WRITE whose payload is not all here', () => {
    const b = Buffer.concat([req(CMD.READ, 4096), req(CMD.WRITE, 512, 512), req(CMD.FLUSH, 0), req(CMD.WRITE, 512, 100)]);
    expect(completeRequests(b, 1 << 20)).toEqual({ bytes: 28 + 540 + 28, requests: 3 });
    expect(completeRequests(b.subarray(0, 27), 1 << 20)).toEqual({ bytes: 0, requests: 0 });
  });
  it('stops after a DISC, before a bad magic or a command that is not NBD’s own', () => {
    expect(completeRequests(Buffer.concat([req(CMD.TRIM, 512), req(CMD.DISC, 0), req(CMD.READ, 512)]), 1 << 20)).toEqual({ bytes: 56, requests: 2 });
    const bad = req(CMD.READ, 512);
    bad.writeUInt32BE(0x12345678, 0);
    expect(completeRequests(Buffer.concat([req(CMD.READ, 512), bad]), 1 << 20)).toEqual({ bytes: 28, requests: 1 });
    expect(completeRequests(Buffer.concat([req(CMD.READ, 512), req(0x4b4c, 512, 512)]), 1 << 20)).toEqual({ bytes: 28, requests: 1 });
  });
  it('bounds the READ and WRITE data run', () => {
    const b = Buffer.concat([req(CMD.READ, 32 << 20), req(CMD.READ, 32 << 20), req(CMD.READ, 1)]);
    expect(completeRequests(b, 64 << 20)).toEqual({ bytes: 56, requests: 2 });
    expect(completeRequests(b, (32 << 20) - 1)).toEqual({ bytes: 0, requests: 0 });
  });
  it('bounds the WRITE data run, and READ and WRITE data together', () => {
    const w = Buffer.concat([req(CMD.WRITE, 512, 512), req(CMD.WRITE, 512, 512), req(CMD.WRITE, 1, 1), req(CMD.FLUSH, 0)]);
    expect(completeRequests(w, 1024)).toEqual({ bytes: 2 * 540, requests: 2 });
    expect(completeRequests(w, 1025)).toEqual({ bytes: 2 * 540 + 29 + 28, requests: 4 });
    // At the server's bound (maxPendingBytes, 64 MiB): a READ and a WRITE of 32 MiB each fill it; a 1-byte WRITE is beyond.
    const m = Buffer.concat([req(CMD.READ, 32 << 20), req(CMD.WRITE, 32 << 20, 32 << 20), req(CMD.WRITE, 1, 1)]);
    expect(completeRequests(m, 64 << 20)).toEqual({ bytes: 28 + 28 + (32 << 20), requests: 2 });
  });
});
