/**
 * NODE_EXTRA_CA_CERTS, read when the first TLS connection to an object store needs it rather than at start.
 *
 * Node 20 reads and parses that file, and its own bundled roots with it, before any JavaScript runs: ≈ 40 ms
 * of CPU at every start for Debian's 220 KB bundle (bench/README.md, session 15), paid by every command
 * although only S3 over https uses it. The `kscinc` executable therefore starts under /bin/sh (the header
 * scripts/bundle-cli.mjs writes into dist/cli/kscinc.cjs) and moves the variable aside before Node starts;
 * the entry (src/cli/kscinc.cts) puts it back into the environment, so child processes see it as before,
 * and records its value under DEFERRED_EXTRA_CA for this process. The S3 store's agent then trusts Node's
 * bundled roots plus that file, as Node itself would have. A library user's process is untouched: Node read
 * the variable itself and nothing is recorded.
 */
import { readFileSync } from 'node:fs';
import * as tls from 'node:tls';

/** The global slot (a registered symbol: one for the bundle and the ES modules alike) the entry fills. */
export const DEFERRED_EXTRA_CA = Symbol.for('kscinc.deferredExtraCaCerts');

let context: tls.SecureContext | null | undefined;

/** The file this process left for later, or null (Node loaded it at start, or none was set). */
export function deferredExtraCa(): string | null {
  const file = (globalThis as Record<symbol, unknown>)[DEFERRED_EXTRA_CA];
  return typeof file === 'string' && file !== '' ? file : null;
}

/**
 * The TLS options of an https agent: a context trusting the bundled roots and the deferred file, made once
 * per process; none when nothing was deferred. An unreadable file is ignored with a warning, as Node does
 * (`Ignoring extra certs from …, load failed`): the bundled roots alone are trusted.
 */
export function extraCaOptions(): { secureContext?: tls.SecureContext } {
  const file = deferredExtraCa();
  if (file === null) return {};
  if (context === undefined) {
    try {
      context = tls.createSecureContext({ ca: [...tls.rootCertificates, readFileSync(file, 'utf8')] });
    } catch (e) {
      process.emitWarning(`Ignoring extra certs from \`${file}\`, load failed: ${(e as Error).message}`);
      context = null;
    }
  }
  return context ? { secureContext: context } : {};
}
