/**
 * A store wrapper (src/objstore/wrapper.ts: every base call passed to `inner`, no optional method passed on)
 * for tests to extend where they watch or steer one operation (record puts, hold a listing). close() leaves
 * `inner` open: the test that made it closes it.
 */
import { StoreWrapper } from '../../src/objstore/wrapper.js';

export class PassThroughStore extends StoreWrapper {
  override close(): Promise<void> {
    return Promise.resolve();
  }
}
