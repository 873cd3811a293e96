/**
 * The connections an upgrade moves (issue 16, formats/control.md §2.1): the old worker sends each parked
 * connection (`handoff`, with its SessionState and the bytes it read and did not parse) as soon as it stops
 * reading; the supervisor holds them, unread, until the new worker has opened the images, then forwards them
 * (`adopt`) and counts the adoptions. If the new worker cannot open the images they go back to the old one.
 */
import type { Socket } from 'node:net';
import { stopReading } from '../nbd/socket-reads.js';
import type { Child } from './child.js';

interface Handed {
  sock: Socket;
  state: unknown;
  pending: string;
}

/** Records a phase's duration in ms (one decimal) since `since`. */
export function markPhase(phases: Record<string, number>, name: string, since: number): void {
  phases[name] = Math.round((performance.now() - since) * 10) / 10;
}

export class Relay {
  /** When the old worker stopped reading (its `parking`): the start of the pause. */
  t0 = performance.now();
  private held: Handed[] = [];
  private toNew = false;
  private forwarded = 0;
  private adoptions = 0;
  private onAdopted = (): void => undefined;

  constructor(private readonly neu: Child) {}

  get heldCount(): number {
    return this.held.length;
  }

  get adoptedCount(): number {
    return this.adoptions;
  }

  /** A `handoff` from the old worker: held, or forwarded once the new worker serves. */
  take(sock: Socket | undefined, state: unknown, pending: string, log: (line: string) => void, debug: boolean): void {
    if (!sock || sock.destroyed) {
      sock?.destroy();
      return;
    }
    // Bytes the supervisor's own handle read after the old worker stopped go with the connection.
    const extra = stopReading(sock);
    if (extra.length && debug) log(`kscinc serve: upgrade: ${extra.length} byte(s) of a connection read in the supervisor go with it`);
    const h = { sock, state, pending: extra.length ? Buffer.concat([Buffer.from(pending, 'base64'), extra]).toString('base64') : pending };
    if (this.toNew) this.forward(h);
    else this.held.push(h);
  }

  /** The new worker opened the images: every held connection goes to it, and later ones at once. */
  forwardAll(): void {
    this.toNew = true;
    for (const h of this.held.splice(0)) this.forward(h);
  }

  /** The new worker failed: held connections go back to `old`, or are closed (the clients reconnect). */
  giveBack(old: Child | null): void {
    for (const h of this.held.splice(0)) {
      if (old) old.send({ t: 'adopt', state: h.state, pending: h.pending }, h.sock);
      else h.sock.destroy();
    }
  }

  /** The upgrade is off: held connections are closed. */
  drop(): void {
    for (const h of this.held.splice(0)) h.sock.destroy();
  }

  /** The new worker's `adopted`. */
  adopted(): void {
    this.adoptions++;
    this.onAdopted();
  }

  /** Resolves once every forwarded connection was adopted. */
  allAdopted(): Promise<void> {
    return new Promise<void>((resolve) => {
      this.onAdopted = () => {
        if (this.adoptions >= this.forwarded) resolve();
      };
      this.onAdopted();
    });
  }

  private forward(h: Handed): void {
    this.forwarded++;
    this.neu.send({ t: 'adopt', state: h.state, pending: h.pending }, h.sock);
  }
}
