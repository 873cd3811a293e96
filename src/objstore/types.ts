/**
 * The object-store contract the backup repository is written against. Two backends implement it: a local
 * directory (the embedded default) and S3 through the `minio` client. Keys are '/'-separated relative
 * names ("packs/ab/ab12….pack"); the backend maps them under its root folder or prefix.
 */

export interface ObjectInfo {
  key: string;
  size: number;
  /** Last modification time, milliseconds since the epoch. */
  mtimeMs: number;
}

export interface ObjectStore {
  /** Human name for messages, e.g. "/srv/repo" or "s3://bucket/prefix". */
  readonly name: string;
  /**
   * Stores `data` under `key`, replacing any object there. Atomic: a reader sees the old object, no object,
   * or the whole new one, never a part. Large bodies (an array of buffers is concatenated) go up in parts
   * (multipart on S3, aborted on failure). Durable when the promise resolves.
   */
  put(key: string, data: Buffer | Buffer[]): Promise<void>;
  /** The whole object; KSC_E_NOT_FOUND when missing. */
  get(key: string): Promise<Buffer>;
  /** `length` bytes from `offset`; KSC_E_NOT_FOUND when missing, KSC_E_CORRUPT when the object is shorter. */
  getRange(key: string, offset: number, length: number): Promise<Buffer>;
  /** null when missing. */
  stat(key: string): Promise<ObjectInfo | null>;
  /** Every object whose key starts with `prefix`, in key order. */
  list(prefix: string): AsyncIterable<ObjectInfo>;
  /** Removes the object; no error when it is already gone. */
  delete(key: string): Promise<void>;
  /** Releases connections and agents. */
  close(): Promise<void>;
}
