/**
 * The real S3 server for tests: a single-node Ceph cluster with RADOS Gateway (scripts/ceph-rgw.sh).
 *
 * The first test file that calls `s3Config()` starts the cluster in the state folder that
 * test/global-setup.ts provides (under a lock, so parallel files start it once; the others wait and share
 * it); global teardown destroys it. If it cannot start, every S3 test fails with the reason: they are
 * never skipped. Tests that kill a gateway use their own (`privateGateway()`): a second radosgw on the same
 * cluster and users, so killing it never disturbs other test files.
 */
import { execFile } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { afterAll, beforeAll, inject } from 'vitest';

declare module 'vitest' {
  export interface ProvidedContext {
    kscincS3State: string;
  }
}

const run = promisify(execFile);
const script = fileURLToPath(new URL('../../scripts/ceph-rgw.sh', import.meta.url));

export interface S3TestConfig {
  endpoint: string;
  accessKey: string;
  secretKey: string;
  region: string;
  /** How long the cluster took to start (ms), measured by whichever file started it. */
  startMs: number;
}

/** The kernel's range for ports it picks itself (listen on port 0, a connect's source port). */
export function ephemeralPorts(): [number, number] {
  try {
    const [lo, hi] = readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').trim().split(/\s+/).map(Number);
    if (lo! > 0 && hi! >= lo!) return [lo!, hi!];
  } catch {
    // not Linux: its default range
  }
  return [32768, 60999];
}

/** Listens on 127.0.0.1:`port`; null when it is taken. */
function hold(port: number): Promise<ReturnType<typeof createServer> | null> {
  return new Promise((resolve) => {
    const s = createServer();
    s.once('error', () => resolve(null));
    s.listen(port, '127.0.0.1', () => resolve(s));
  });
}

/**
 * Free TCP ports on 127.0.0.1 for servers started later (held open together so they differ). Outside the
 * kernel's ephemeral range: a port from listen(0) may be handed to any other listen(0) or outgoing connection
 * on the machine before the server binds it (the S3 cluster binds its gateway's port tens of seconds later,
 * after the monitor and the OSD; test files running side by side make that likely). Random ones, tried.
 */
export async function freePorts(n: number): Promise<number[]> {
  const [lo, hi] = ephemeralPorts();
  // Below the range when there is room (above 10000: clear of the usual services), else above it.
  const [from, to] = lo - 1 >= 12_000 ? [10_000, lo - 1] : [hi + 1, 65_535];
  const held: ReturnType<typeof createServer>[] = [];
  const ports: number[] = [];
  try {
    for (let tries = 0; ports.length < n; tries++) {
      if (tries > 1000) throw new Error(`no ${n} free ports in ${from}–${to}`);
      const port = from + Math.floor(Math.random() * (to - from + 1));
      if (ports.includes(port)) continue;
      const s = await hold(port);
      if (!s) continue;
      held.push(s);
      ports.push(port);
    }
  } finally {
    await Promise.all(held.map((s) => new Promise((r) => s.close(r))));
  }
  return ports;
}

function stateDir(): string {
  const state = inject('kscincS3State');
  if (!state) throw new Error('S3 tests need the state folder from test/global-setup.ts (vitest.config.ts globalSetup)');
  return state;
}

function cephEnv(extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  return { ...process.env, CEPH_DIR: join(stateDir(), 'ceph'), CEPH_MGR: '0', ...extra };
}

// Runs under `flock`: starts the cluster once per run, or reports the first start's failure again.
const START = `
[ -s "$STATE/env" ] && exit 0
[ -s "$STATE/failed" ] && exit 3
t0=$(date +%s%N)
if bash "$SCRIPT" start >"$STATE/env.tmp" 2>"$STATE/start.log"; then
  echo "START_MS=$(( ($(date +%s%N) - t0) / 1000000 ))" >>"$STATE/env.tmp"
  mv "$STATE/env.tmp" "$STATE/env"
else
  rc=$?
  { echo "scripts/ceph-rgw.sh start failed (exit $rc); the end of its log:"; tail -n 15 "$STATE/start.log"; } >"$STATE/failed"
  exit 3
fi`;

function parseEnv(text: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const line of text.split('\n')) {
    const m = /^([A-Z0-9_]+)=(.*)$/.exec(line);
    if (m) out[m[1]!] = m[2]!;
  }
  return out;
}

async function startCluster(): Promise<S3TestConfig> {
  const state = stateDir();
  const [rgw, mon2, mon1] = await freePorts(3);
  try {
    // -o: the daemons the script leaves running must not inherit (and so hold) the lock.
    await run('flock', ['-o', '-w', '300', join(state, 'lock'), 'bash', '-c', START], {
      env: cephEnv({ STATE: state, SCRIPT: script, RGW_PORT: String(rgw), CEPH_MON_PORT: String(mon2), CEPH_MON_PORT_V1: String(mon1) }),
      timeout: 320_000,
    });
  } catch (e) {
    let why = (e as Error).message;
    try {
      why = readFileSync(join(state, 'failed'), 'utf8');
    } catch {
      // no report: keep the exec error
    }
    throw new Error(
      `the S3 tests need a local Ceph RGW (real S3 server) and it could not be started.\n${why.trim()}\n` +
        'Install Ceph with `bash scripts/ceph-rgw.sh install` as root (scripts/setup.sh does it when missing).',
    );
  }
  const env = parseEnv(readFileSync(join(state, 'env'), 'utf8'));
  return {
    endpoint: env.S3_ENDPOINT!,
    accessKey: env.S3_ACCESS_KEY!,
    secretKey: env.S3_SECRET_KEY!,
    region: env.S3_REGION ?? 'us-east-1',
    startMs: Number(env.START_MS ?? 0),
  };
}

let cluster: Promise<S3TestConfig> | undefined;

/** Endpoint and keys of the shared test S3 server, starting it on first use. */
export function s3Config(): Promise<S3TestConfig> {
  cluster ??= startCluster();
  return cluster;
}

/** The environment `openStore` reads S3 settings from, for `cfg`. */
export function s3Env(cfg: Pick<S3TestConfig, 'endpoint' | 'accessKey' | 'secretKey' | 'region'>): NodeJS.ProcessEnv {
  return { KSCINC_S3_ENDPOINT: cfg.endpoint, AWS_ACCESS_KEY_ID: cfg.accessKey, AWS_SECRET_ACCESS_KEY: cfg.secretKey, AWS_REGION: cfg.region };
}

let counter = 0;
/** A bucket name no other test uses. */
export function freshBucket(tag = 't'): string {
  return `${tag}-${process.pid}-${Date.now().toString(36)}-${counter++}`.toLowerCase();
}
/** A prefix no other test uses. */
export function freshPrefix(tag = 'p'): string {
  return `${tag}${counter++}/${Date.now().toString(36)}`;
}

export interface Gateway {
  name: string;
  config: S3TestConfig;
  /** Kills the radosgw daemon (SIGKILL: a server dying); the cluster and data stay. */
  stop(): Promise<void>;
  /** Starts it again on the same port and waits until it answers HTTP. */
  start(): Promise<void>;
  /** Sends a signal to the radosgw process (e.g. SIGSTOP/SIGCONT: a server that hangs). */
  signal(sig: NodeJS.Signals): void;
  /** SIGKILL sent now (synchronously, e.g. from inside a callback); resolves once the process is gone. */
  crash(): Promise<void>;
  /** Stops it for good (call in afterAll). */
  close(): Promise<void>;
}

/**
 * Runs a gateway subcommand under a shared lock: the teardown takes it exclusively, so it never destroys the
 * cluster while a gateway is being started, and a start that comes after finds no cluster instead of leaving
 * an orphan daemon.
 */
async function rgwCommand(args: string[], extra: Record<string, string> = {}): Promise<string> {
  const { stdout } = await run('flock', ['-s', '-o', '-w', '120', join(stateDir(), 'lock'), 'bash', script, ...args], { env: cephEnv(extra), timeout: 150_000 });
  return stdout;
}

function pidOf(gateway: string): number {
  return Number(readFileSync(join(stateDir(), 'ceph', 'pids', `rgw.${gateway}`), 'utf8'));
}

/** Exists and is not a zombie (init may take a moment to reap a killed daemon). */
function alive(pid: number): boolean {
  try {
    return !/^\d+ \(.*\) Z/.test(readFileSync(`/proc/${pid}/stat`, 'utf8'));
  } catch {
    return false;
  }
}

/** A radosgw of this test file's own on the shared cluster (same users and buckets), to kill and restart. */
export async function privateGateway(): Promise<Gateway> {
  const shared = await s3Config();
  const name = `t${process.pid}n${counter++}`;
  const [port] = await freePorts(1);
  const env = parseEnv(await rgwCommand(['start-rgw', name], { RGW_PORT: String(port) }));
  const gw: Gateway = {
    name,
    config: { ...shared, endpoint: env.S3_ENDPOINT! },
    stop: async () => void (await rgwCommand(['stop-rgw', name])),
    start: async () => void (await rgwCommand(['start-rgw', name])),
    signal: (sig) => {
      process.kill(pidOf(name), sig);
    },
    crash: async () => {
      const pid = pidOf(name);
      process.kill(pid, 'SIGKILL');
      for (let i = 0; i < 1200 && alive(pid); i++) await new Promise((r) => setTimeout(r, 25)); // up to 30 s on a loaded machine
    },
    close: async () => void (await rgwCommand(['stop-rgw', name], { RGW_STOP_SIGNAL: 'KILL' })),
  };
  return gw;
}

/** Kills the gateway's radosgw. */
export function stopGateway(gw: Gateway): Promise<void> {
  return gw.stop();
}
/** Restarts the gateway's radosgw and waits until it answers. */
export function startGateway(gw: Gateway): Promise<void> {
  return gw.start();
}

/**
 * A private gateway (privateGateway) for the tests of one file: started before them (4 minutes allowed: a
 * first start brings the cluster up), and after them continued (a test may have SIGSTOPped it) and closed.
 * Call at the top level of the file; the object stands for the gateway once beforeAll has run.
 */
export function gatewayForFile(): Gateway & { env(): Record<string, string> } {
  let g: Gateway | undefined;
  beforeAll(async () => {
    g = await privateGateway();
  }, 240_000);
  afterAll(async () => {
    if (!g) return;
    try {
      g.signal('SIGCONT');
    } catch {
      /* not running: close says so */
    }
    await g.close();
  });
  const it = (): Gateway => {
    if (!g) throw new Error('the private gateway has not started (gatewayForFile: beforeAll failed or has not run)');
    return g;
  };
  return {
    get name() {
      return it().name;
    },
    get config() {
      return it().config;
    },
    stop: () => it().stop(),
    start: () => it().start(),
    signal: (sig) => it().signal(sig),
    crash: () => it().crash(),
    close: () => it().close(),
    env: () => s3Env(it().config) as Record<string, string>,
  };
}
