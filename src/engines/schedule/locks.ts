/**
 * In-process locks of the daemon: one backup at a time per disk (a FIFO mutex per image), and per
 * repository any number of backups or one prune (a FIFO reader-writer lock; prune needs the repository's
 * exclusive lock, which a running backup would make it fail to take).
 */

type Release = () => void;

export class KeyedMutex {
  private readonly tails = new Map<string, Promise<void>>();

  /** Resolves with the release function once every earlier holder of `key` has released it. */
  async acquire(key: string): Promise<Release> {
    const prev = this.tails.get(key) ?? Promise.resolve();
    let release!: Release;
    const mine = new Promise<void>((r) => (release = r));
    const tail = prev.then(() => mine);
    this.tails.set(key, tail);
    await prev;
    let done = false;
    return () => {
      if (done) return;
      done = true;
      release();
      if (this.tails.get(key) === tail) this.tails.delete(key);
    };
  }
}

interface RwState {
  readers: number;
  writer: boolean;
  queue: { write: boolean; go: () => void }[];
}

export class KeyedRwLock {
  private readonly states = new Map<string, RwState>();

  shared(key: string): Promise<Release> {
    return this.take(key, false);
  }

  exclusive(key: string): Promise<Release> {
    return this.take(key, true);
  }

  private take(key: string, write: boolean): Promise<Release> {
    let s = this.states.get(key);
    if (!s) this.states.set(key, (s = { readers: 0, writer: false, queue: [] }));
    const st = s;
    return new Promise<Release>((resolve) => {
      st.queue.push({
        write,
        go: () => {
          let done = false;
          resolve(() => {
            if (done) return;
            done = true;
            if (write) st.writer = false;
            else st.readers--;
            this.pump(key, st);
          });
        },
      });
      this.pump(key, st);
    });
  }

  /** Grants the head of the queue while it fits (FIFO: a waiting prune holds back later backups). */
  private pump(key: string, s: RwState): void {
    while (s.queue.length > 0) {
      const head = s.queue[0]!;
      if (head.write ? s.readers > 0 || s.writer : s.writer) break;
      s.queue.shift();
      if (head.write) s.writer = true;
      else s.readers++;
      head.go();
    }
    if (s.queue.length === 0 && s.readers === 0 && !s.writer) this.states.delete(key);
  }
}
