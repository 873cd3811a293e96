/**
 * What the control socket's per-image operations share (migrate-control.ts, replicate-control.ts): the served
 * images, one slot per image for the operation running on it, and the question whether any of them forbids
 * an upgrade now. The images are given again after a hot upgrade (setDevices): same order, new devices.
 */
import type { BlockDevice } from '../image/types.js';

export interface ServedDevice {
  image: string;
  device: BlockDevice;
}

export abstract class DeviceSlots<T> {
  /** The operation of each image (same index as devices), or null. */
  protected readonly slots: (T | null)[];

  constructor(
    protected devices: ServedDevice[],
    protected readonly log: (line: string) => void,
  ) {
    this.slots = devices.map(() => null);
  }

  setDevices(devices: ServedDevice[]): void {
    this.devices = devices;
  }

  /** A sentence naming what runs on devices[index] and forbids other operations there, or null. */
  abstract blocking(index: number): string | null;

  /** A sentence naming an operation that forbids an upgrade now, or null. */
  running(): string | null {
    for (let i = 0; i < this.slots.length; i++) {
      const b = this.blocking(i);
      if (b) return b;
    }
    return null;
  }
}
