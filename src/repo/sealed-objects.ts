/**
 * How a repository's index objects and manifests are stored (formats/repository.md §13.4): sealed whole in
 * an encrypted repository, plain otherwise; and §13.1 rule 2 where they are read: without keys, an object
 * that is sealed shows a config stripped of its encryption and is refused (KSC_E_AUTH), never decoded as
 * plain, whether it is read whole or in ranges.
 */
import { KscError } from '../errors.js';
import { type Body, type ObjectStore, bodyParts } from '../objstore/types.js';
import { AuthError, isSealed, open as openSealed, seal } from '../crypto/aead.js';
import type { RepoKeys } from '../crypto/keys.js';

export class SealedObjects {
  /** `keys`: the repository's derived keys, null when its config says it is not encrypted. */
  constructor(
    private readonly store: ObjectStore,
    private readonly keys: RepoKeys | null,
  ) {}

  private objName(key: string): string {
    return `${this.store.name}/${key}`;
  }

  /** §13.4: an object as stored (sealed in an encrypted repository). */
  seal(kind: number, key: string, plain: Body): Body {
    // Sealed whole: an encrypted manifest or index object is held in memory once (not streamed).
    return this.keys ? seal(this.keys.data, kind, key, [...bodyParts(plain)]) : plain;
  }

  /** §13.1 rule 2 without keys: `head` (an object's first bytes, or all of it) sealed means a stripped config (KSC_E_AUTH). */
  private refuseSealed(key: string, head: Buffer): void {
    if (isSealed(head))
      throw new KscError(
        'KSC_E_AUTH',
        `repository object ${this.objName(key)} is sealed (encrypted, §13.4) but the config says the repository is not encrypted: the config was stripped of its encryption; refusing (formats/repository.md §13.1 rule 2)`,
      );
  }

  /** Ranged reads of an object read in the clear (no keys): its first range is refused when sealed, as open does. */
  plainRanges(key: string): (offset: number, length: number) => Promise<Buffer> {
    return async (offset, length) => {
      const b = await this.store.getRange(key, offset, length);
      if (offset === 0) this.refuseSealed(key, b);
      return b;
    };
  }

  /** §13.4: the plain bytes of a stored object, authenticated first in an encrypted repository (KSC_E_CORRUPT naming it). */
  open(kind: number, key: string, stored: Buffer): Buffer {
    if (!this.keys) {
      this.refuseSealed(key, stored);
      return stored;
    }
    try {
      return openSealed(this.keys.data, kind, key, stored);
    } catch (e) {
      if (e instanceof AuthError) throw new KscError('KSC_E_CORRUPT', `repository object ${this.objName(key)}: ${e.message}`);
      throw e;
    }
  }
}
