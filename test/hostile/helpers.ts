/**
 * Hostile-test rig for a real `kscinc serve --incoming` destination (formats/migrate.md §11.7): the process
 * is spawned (no supervisor, so a kill is final), the test plays the replication source with the project's
 * own NBD client (token, cycle tag, begin and commit contexts), and checks a promoted image against raw
 * references with qemu-img compare over NBD.
 */
import { join } from 'node:path';
import { expect } from 'vitest';
import { NbdClient, parseNbdUri } from '../../src/nbd/client.js';
import { BEGIN_CONTEXT, COMMIT_CONTEXT, CYCLE_CONTEXT, TOKEN_CONTEXT } from '../../src/nbd/incoming.js';
import { run } from '../helpers/cli.js';
import { serveListening, spawnServe, type ServeChild, type Served } from '../helpers/serve.js';

export type Dest = Served & { token: string };

/** `kscinc serve FILE --incoming --no-supervisor` with `env` (a fault plan, say); waits for its URI and token. */
export async function serveIncoming(file: string, env: Record<string, string> = {}, extra: string[] = []): Promise<Dest> {
  const s = await serveListening([file, '--listen', '127.0.0.1:0', '--export-name', 'd', '--incoming', '--no-supervisor', ...extra], { env, timeoutMs: 60_000 });
  return { ...s, token: s.token! };
}

/** `kscinc serve FILE --no-supervisor` (promotion when FILE has a cycle log); waits for its URI. */
export async function servePlain(file: string): Promise<{ child: ServeChild; uri: string; stop: () => Promise<number | null> }> {
  const child = spawnServe([file, '--listen', '127.0.0.1:0', '--export-name', 'd', '--no-supervisor'], { timeoutMs: 60_000 });
  const uri = (await child.uris)[0]!;
  return {
    child,
    uri,
    stop: () => {
      if (child.proc.exitCode === null && child.proc.signalCode === null) child.proc.kill('SIGTERM');
      return child.exited;
    },
  };
}

/** A client of `uri` selecting `contexts` (structured replies). */
export function connect(uri: string, contexts: string[] = [], timeoutMs = 60_000): Promise<NbdClient> {
  const u = parseNbdUri(uri);
  return NbdClient.connect({ host: u.host, port: u.port, exportName: u.exportName, structured: true, setContexts: contexts, timeoutMs });
}

export const tokenCtx = (token: string): string => TOKEN_CONTEXT + token;
export const cycleCtx = (token: string, cycle: string): string => `${CYCLE_CONTEXT}${token}:${cycle}`;
export const beginCtx = (token: string, cycle: string): string => `${BEGIN_CONTEXT}${token}:${cycle}`;
export const commitCtx = (token: string, cycle: string): string => `${COMMIT_CONTEXT}${token}:${cycle}`;

/** Selects `ctx` on a connection of its own (begin or commit); true when the destination answered it. */
export async function signal(uri: string, ctx: string): Promise<boolean> {
  const c = await connect(uri, [ctx]);
  try {
    return [...c.selected.values()].includes(ctx);
  } finally {
    await c.disconnect().catch(() => undefined);
  }
}

/** qemu-img compare of a raw reference against an NBD export: true when identical. */
export function sameAs(raw: string, uri: string): boolean {
  const r = run('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'raw', raw, uri]);
  expect([0, 1], `qemu-img compare ${raw} ${uri}: ${r.stderr}`).toContain(r.code);
  return r.code === 0;
}

export const hex = (n: number): string => n.toString(16).padStart(32, '0');
export const at = (dir: string, name: string): string => join(dir, name);
