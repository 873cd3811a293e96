/**
 * NODE_EXTRA_CA_CERTS, read when the first TLS connection to an object store needs it rather than at start.
 *
 * Node 20 reads and parses that file, and its own bundled roots with it, before any JavaScript runs: ≈ 40 ms
 * of CPU at every start for Debian's 220 KB bundle (bench/README.md, session 15), paid by every command
 * although only S3 over https uses it. The `kscinc` executable therefore starts under /bin/sh (the header
 * scripts/bundle-cli.mjs writes into dist/cli/kscinc.cjs) and moves the variable aside before Node starts;
 * the entry (src/cli/kscinc.cts) puts it back into the environment, so child processes see it as before,
 * and sets DEFERRED_IN to its pid: this process (and its worker threads, which share the pid and copy the
 * environment) did not parse the file; a child, whose Node did, has another pid. The S3 store's agent then trusts Node's
 * default roots plus that file, as Node itself would have. A library user's process is untouched: Node read
 * the variable itself and nothing is recorded.
 */
import { readFileSync } from 'node:fs';
import * as tls from 'node:tls';

/** The environment variable naming the process (pid) whose Node left NODE_EXTRA_CA_CERTS unread. */
export const DEFERRED_IN = 'KSCINC_EXTRA_CA_DEFERRED_IN';

let context: tls.SecureContext | null | undefined;

/** The file this process left for later, or null (Node loaded it at start, or none was set). */
export function deferredExtraCa(): string | null {
  const file = process.env.NODE_EXTRA_CA_CERTS;
  return process.env[DEFERRED_IN] === String(process.pid) && file ? file : null;
}

/** Node's SecureContext object behind tls.SecureContext (not in the typings; present in Node 20 … 24). */
interface NativeContext {
  addCACert?: (pem: string) => void;
}

/**
 * The TLS options of an https agent: a context trusting Node's default roots and the deferred file, made
 * once per process; none when nothing was deferred. The default context gets the file's certificates added
 * (Node copies its shared root store first, so other contexts are unchanged): the same store Node makes
 * for NODE_EXTRA_CA_CERTS, whichever roots it uses (bundled, or OpenSSL's with --use-openssl-ca). Should
 * that method be missing, the bundled roots and the file are given as `ca`. An unreadable file is ignored
 * with a warning, as Node does (`Ignoring extra certs from …, load failed`): the default roots are trusted.
 */
export function extraCaOptions(): { secureContext?: tls.SecureContext } {
  const file = deferredExtraCa();
  if (file === null) return {};
  if (context === undefined) {
    try {
      const pem = readFileSync(file, 'utf8');
      const c = tls.createSecureContext();
      const native = (c as unknown as { context?: NativeContext }).context;
      if (typeof native?.addCACert === 'function') {
        native.addCACert(pem);
        context = c;
      } else {
        context = tls.createSecureContext({ ca: [...tls.rootCertificates, pem] });
      }
    } catch (e) {
      process.emitWarning(`Ignoring extra certs from \`${file}\`, load failed: ${(e as Error).message}`);
      context = null;
    }
  }
  return context ? { secureContext: context } : {};
}
