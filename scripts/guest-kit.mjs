#!/usr/bin/env node
/**
 * The test guest: a Debian kernel and an initramfs made here from busybox-static, the kernel's virtio modules
 * (with their dependencies) and an /init that runs a script handed over by QEMU's fw_cfg, printing results on
 * the serial console as `KSC-RESULT <name> <value>` lines, then powers off. scripts/setup.sh installs the
 * parts (qemu-system-x86, busybox-static, a kernel unpacked into /opt/kscinc-guest); test/helpers/guest.ts
 * boots it.
 *
 *   node scripts/guest-kit.mjs build [--cache DIR]          prints {"kernel", "initrd", "version", "modules"}
 *   node scripts/guest-kit.mjs run --nbd URI --script FILE [--timeout S] [--cache DIR]
 *                                                           boots once, prints the console, exits with the
 *                                                           script's exit status
 *
 * Kernel search order: $KSCINC_GUEST_KERNEL (a vmlinuz) with $KSCINC_GUEST_MODULES (its /lib/modules/<ver>),
 * then /opt/kscinc-guest/boot, then /boot; a vmlinuz-<ver> counts only when its modules folder exists.
 * The initramfs is cached under --cache (default $TMPDIR/kscinc-guest) by a key of its inputs.
 */
import { createHash } from 'node:crypto';
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, readdirSync, renameSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { gzipSync, gunzipSync } from 'node:zlib';

/** Bump when the initramfs layout or its scripts change, so cached images are rebuilt. */
const KIT_VERSION = 3;
/** Modules the guest loads, in any order (dependencies are added and ordered here). */
const WANTED = ['virtio_pci', 'virtio_blk', 'qemu_fw_cfg'];
export const GUEST_ROOT = '/opt/kscinc-guest';
export const SCRIPT_FW_CFG = 'opt/kscinc/script';
export const BUSYBOX = '/bin/busybox';

function fail(msg) {
  const e = new Error(`guest kit: ${msg}`);
  e.code = 'KSC_E_GUEST_KIT';
  throw e;
}

/** Finds a kernel image and its modules folder. */
export function findKernel() {
  const envK = process.env.KSCINC_GUEST_KERNEL;
  if (envK) {
    const mods = process.env.KSCINC_GUEST_MODULES;
    if (!mods || !existsSync(envK) || !existsSync(mods)) fail(`KSCINC_GUEST_KERNEL=${envK} needs KSCINC_GUEST_MODULES (its lib/modules/<version> folder); one of them is missing`);
    return { kernel: envK, modules: mods, version: basename(mods) };
  }
  for (const root of [GUEST_ROOT, '/']) {
    const boot = join(root, 'boot');
    if (!existsSync(boot)) continue;
    const versions = readdirSync(boot)
      .filter((f) => f.startsWith('vmlinuz-'))
      .map((f) => f.slice('vmlinuz-'.length))
      .filter((v) => existsSync(join(root, 'lib/modules', v, 'kernel')))
      .sort((a, b) => b.localeCompare(a, 'en', { numeric: true }));
    if (versions.length > 0) return { kernel: join(boot, `vmlinuz-${versions[0]}`), modules: join(root, 'lib/modules', versions[0]), version: versions[0] };
  }
  fail(`no kernel found: neither ${GUEST_ROOT}/boot nor /boot has a vmlinuz-<ver> with lib/modules/<ver>; run scripts/setup.sh as root`);
}

/** The NUL-separated key=value strings of an ELF64 module's .modinfo section. */
export function modinfo(ko, file) {
  const u16 = (o) => ko.readUInt16LE(o);
  const u64 = (o) => Number(ko.readBigUInt64LE(o));
  if (ko.length < 64 || ko.readUInt32BE(0) !== 0x7f454c46 || ko[4] !== 2 || ko[5] !== 1) fail(`${file}: not a little-endian ELF64 module`);
  const shoff = u64(0x28);
  const shentsize = u16(0x3a);
  const shnum = u16(0x3c);
  const shstrndx = u16(0x3e);
  if (shoff + shnum * shentsize > ko.length || shstrndx >= shnum) fail(`${file}: section table out of range`);
  const sec = (i) => ({ name: ko.readUInt32LE(shoff + i * shentsize), off: u64(shoff + i * shentsize + 0x18), size: u64(shoff + i * shentsize + 0x20) });
  const strtab = sec(shstrndx);
  for (let i = 0; i < shnum; i++) {
    const s = sec(i);
    const nameAt = strtab.off + s.name;
    const name = ko.toString('latin1', nameAt, ko.indexOf(0, nameAt));
    if (name !== '.modinfo') continue;
    if (s.off + s.size > ko.length) fail(`${file}: .modinfo out of range`);
    const info = {};
    for (const kv of ko.toString('latin1', s.off, s.off + s.size).split('\0')) {
      const eq = kv.indexOf('=');
      if (eq > 0) info[kv.slice(0, eq)] = kv.slice(eq + 1);
    }
    return info;
  }
  fail(`${file}: no .modinfo section`);
}

function readModule(path) {
  const raw = readFileSync(path);
  if (path.endsWith('.ko')) return raw;
  if (path.endsWith('.ko.gz')) return gunzipSync(raw);
  fail(`${path}: compressed module format not supported here (use a kernel with uncompressed or gzip modules)`);
}

/** Every module file under dir by its name (dashes as underscores, as the kernel names them). */
function moduleIndex(dir) {
  const index = new Map();
  const walk = (d) => {
    for (const e of readdirSync(d, { withFileTypes: true })) {
      const p = join(d, e.name);
      if (e.isDirectory()) walk(p);
      else if (/\.ko(\.gz|\.xz|\.zst)?$/.test(e.name)) index.set(e.name.replace(/\.ko(\..*)?$/, '').replace(/-/g, '_'), p);
    }
  };
  walk(join(dir, 'kernel'));
  return index;
}

/** The modules to load, dependencies first; built-in ones are left out. */
export function resolveModules(modulesDir, wanted = WANTED) {
  const builtinFile = join(modulesDir, 'modules.builtin');
  const builtin = new Set(
    existsSync(builtinFile)
      ? readFileSync(builtinFile, 'utf8')
          .split('\n')
          .filter(Boolean)
          .map((l) => basename(l).replace(/\.ko$/, '').replace(/-/g, '_'))
      : [],
  );
  const index = moduleIndex(modulesDir);
  const order = [];
  const state = new Map();
  const visit = (name, from) => {
    if (builtin.has(name) || state.get(name) === 'done') return;
    if (state.get(name) === 'visiting') fail(`module dependency cycle at ${name}`);
    const path = index.get(name);
    if (!path) fail(`module ${name} (needed by ${from}) is neither built in nor under ${modulesDir}/kernel`);
    state.set(name, 'visiting');
    const data = readModule(path);
    const deps = (modinfo(data, path).depends ?? '').split(',').filter(Boolean);
    for (const d of deps) visit(d.replace(/-/g, '_'), name);
    state.set(name, 'done');
    order.push({ name, data });
  };
  for (const w of wanted) visit(w, 'the guest');
  return order;
}

/** A cpio "newc" archive (the kernel's initramfs format) of [{name, mode, data?, target?}]. */
export function cpioNewc(entries) {
  const parts = [];
  let ino = 1;
  const hex = (n) => n.toString(16).padStart(8, '0');
  const pad4 = (n) => Buffer.alloc((4 - (n % 4)) % 4);
  const push = (name, mode, body) => {
    const nameBuf = Buffer.from(`${name}\0`);
    const fields = [0x1000 + ino++, mode, 0, 0, 1, 0, body.length, 0, 0, 0, 0, nameBuf.length, 0];
    const head = Buffer.from(`070701${fields.map(hex).join('')}`);
    parts.push(head, nameBuf, pad4(head.length + nameBuf.length), body, pad4(body.length));
  };
  for (const e of entries) {
    if (e.target !== undefined) push(e.name, 0o120777, Buffer.from(e.target));
    else if (e.data === undefined) push(e.name, 0o040755, Buffer.alloc(0));
    else push(e.name, 0o100000 | (e.mode ?? 0o644), Buffer.isBuffer(e.data) ? e.data : Buffer.from(e.data));
  }
  push('TRAILER!!!', 0, Buffer.alloc(0));
  return Buffer.concat(parts);
}

/** Refuses a dynamically linked busybox: the initramfs has no libc. */
function checkStatic(bin, path) {
  if (bin.length < 64 || bin.readUInt32BE(0) !== 0x7f454c46) fail(`${path} is not an ELF executable`);
  const phoff = Number(bin.readBigUInt64LE(0x20));
  const phentsize = bin.readUInt16LE(0x36);
  for (let i = 0; i < bin.readUInt16LE(0x38); i++) {
    if (bin.readUInt32LE(phoff + i * phentsize) === 3) fail(`${path} is dynamically linked; install busybox-static (scripts/setup.sh)`);
  }
}

const INIT = readFileSync(fileURLToPath(new URL('guest/init.sh', import.meta.url)));
const LIB = readFileSync(fileURLToPath(new URL('guest/ksc.sh', import.meta.url)));

/** Builds (or finds in the cache) the initramfs; returns the paths QEMU needs. */
export function buildGuest(cacheDir = join(process.env.TMPDIR || tmpdir(), 'kscinc-guest')) {
  const k = findKernel();
  if (!existsSync(BUSYBOX)) fail(`${BUSYBOX} is missing; install busybox-static (scripts/setup.sh)`);
  const bb = statSync(BUSYBOX);
  const key = createHash('sha256')
    .update(JSON.stringify([KIT_VERSION, k.kernel, k.modules, statSync(k.kernel).mtimeMs, bb.size, bb.mtimeMs, WANTED]))
    .update(INIT)
    .update(LIB)
    .digest('hex')
    .slice(0, 16);
  const initrd = join(cacheDir, `initrd-${k.version}-${key}.cpio.gz`);
  const mods = resolveModules(k.modules);
  const result = { kernel: k.kernel, initrd, version: k.version, modules: mods.map((m) => m.name) };
  if (existsSync(initrd)) return result;
  const busybox = readFileSync(BUSYBOX);
  checkStatic(busybox, BUSYBOX);
  const entries = ['bin', 'dev', 'proc', 'sys', 'tmp', 'etc', 'lib', 'lib/modules'].map((name) => ({ name }));
  entries.push({ name: 'bin/busybox', data: busybox, mode: 0o755 }, { name: 'bin/sh', target: 'busybox' });
  entries.push({ name: 'init', data: INIT, mode: 0o755 }, { name: 'lib/ksc.sh', data: LIB });
  for (const m of mods) entries.push({ name: `lib/modules/${m.name}.ko`, data: m.data });
  entries.push({ name: 'etc/ksc-modules', data: mods.map((m) => m.name).join('\n') + '\n' });
  mkdirSync(cacheDir, { recursive: true });
  const tmp = `${initrd}.${process.pid}.tmp`;
  writeFileSync(tmp, gzipSync(cpioNewc(entries), { level: 1 }));
  renameSync(tmp, initrd);
  return result;
}

/**
 * The kernel command line. Besides the console, it skips work a throwaway TCG guest does not need (measured
 * on 2 loaded cores: about 0.5 s of the boot's 3 s of QEMU CPU time): crypto self-tests, LSMs, audit,
 * the watchdog, delay-loop calibration and keyboard-controller probing.
 */
const APPEND = [
  'console=ttyS0 quiet panic=-1',
  'mitigations=off tsc=reliable no_timer_check lpj=4000000 random.trust_cpu=on',
  'cryptomgr.notests lsm= apparmor=0 audit=0 nowatchdog i8042.noaux i8042.nopnp',
].join(' ');

/**
 * KVM when it works, else TCG. A /dev/kvm that opens is not enough: on some virtual machines (nested
 * virtualisation) a KVM guest runs the firmware, then hangs in the kernel's decompressor and prints nothing
 * more. So the kernel is booted once under KVM without an initramfs: a working KVM prints "Linux version" and
 * panics (no root) within a second or two; a broken one prints nothing within the probe's 10 s. The answer is
 * kept per boot of the host (its boot_id) in the temporary folder. KSCINC_GUEST_ACCEL=kvm|tcg decides instead.
 */
let accelChosen;
export function accelerator(kernel) {
  if (accelChosen) return accelChosen;
  const forced = process.env.KSCINC_GUEST_ACCEL;
  if (forced === 'kvm' || forced === 'tcg') return (accelChosen = forced);
  if (!existsSync('/dev/kvm')) return (accelChosen = 'tcg');
  let boot = 'unknown';
  try {
    boot = readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim();
  } catch {}
  const memo = join(tmpdir(), `kscinc-guest-accel-${boot}`);
  try {
    const v = readFileSync(memo, 'utf8').trim();
    if (v === 'kvm' || v === 'tcg') return (accelChosen = v);
  } catch {}
  const r = spawnSync(
    'qemu-system-x86_64',
    [
      '-machine',
      'pc,accel=kvm',
      '-cpu',
      'host',
      '-m',
      '128',
      '-nodefaults',
      '-no-user-config',
      '-display',
      'none',
      '-serial',
      'stdio',
      '-no-reboot',
      '-kernel',
      kernel,
      '-append',
      'console=ttyS0 panic=-1',
    ],
    { encoding: 'latin1', timeout: 10_000, killSignal: 'SIGKILL', stdio: ['ignore', 'pipe', 'pipe'] },
  );
  accelChosen = /Linux version/.test(r.stdout ?? '') ? 'kvm' : 'tcg';
  try {
    writeFileSync(memo, accelChosen + '\n');
  } catch {}
  if (accelChosen === 'tcg') process.stderr.write('guest-kit: /dev/kvm is present but a KVM guest did not boot within 10 s: using TCG\n');
  return accelChosen;
}

/**
 * The QEMU command line for one boot (test/helpers/guest.ts uses the same). `driveOpts` are appended to the
 * disk's -drive (e.g. `file.reconnect-delay=5`), `extra` to the command line (e.g. -qmp, -incoming). The
 * serial console is QEMU's stdin/stdout: what is written to stdin reaches the guest's /dev/console.
 */
export function qemuArgs({ kernel, initrd, nbd, scriptFile, memMiB = 256, append = '', driveOpts = '', extra = [] }) {
  const accel = accelerator(kernel);
  return [
    ...['-machine', `pc,accel=${accel}`, '-cpu', accel === 'kvm' ? 'host' : 'max', '-m', String(memMiB), '-smp', '1'],
    ...['-nodefaults', '-no-user-config', '-display', 'none', '-serial', 'stdio', '-no-reboot'],
    ...['-kernel', kernel, '-initrd', initrd],
    ...['-append', `${APPEND} ${append}`.trim()],
    ...['-fw_cfg', `name=${SCRIPT_FW_CFG},file=${scriptFile}`],
    ...['-drive', `file=${nbd},format=raw,if=virtio,cache=none,discard=unmap${driveOpts ? `,${driveOpts}` : ''}`],
    ...extra,
  ];
}

async function main(argv) {
  const opt = (name) => {
    const i = argv.indexOf(name);
    return i >= 0 ? argv[i + 1] : undefined;
  };
  const cache = opt('--cache');
  if (argv[0] === 'build') {
    process.stdout.write(JSON.stringify(buildGuest(cache)) + '\n');
    return 0;
  }
  if (argv[0] === 'run') {
    const nbd = opt('--nbd');
    const scriptFile = opt('--script');
    if (!nbd || !scriptFile) fail('run needs --nbd URI and --script FILE');
    const g = buildGuest(cache);
    const timeoutS = Number(opt('--timeout') ?? 120);
    const q = spawn('qemu-system-x86_64', qemuArgs({ ...g, nbd, scriptFile }), { stdio: ['ignore', 'pipe', 'inherit'] });
    let log = '';
    q.stdout.on('data', (d) => {
      log += d.toString();
      process.stdout.write(d);
    });
    const timer = setTimeout(() => q.kill('SIGKILL'), timeoutS * 1000);
    await new Promise((r) => q.once('exit', r));
    clearTimeout(timer);
    const m = /^KSC-EXIT (\d+)/m.exec(log);
    return m ? Number(m[1]) : 125;
  }
  process.stderr.write('usage: guest-kit.mjs build [--cache DIR] | run --nbd URI --script FILE [--timeout S] [--cache DIR]\n');
  return 2;
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  main(process.argv.slice(2)).then(
    (code) => process.exit(code),
    (e) => {
      process.stderr.write(`${e.message}\n`);
      process.exit(1);
    },
  );
}
