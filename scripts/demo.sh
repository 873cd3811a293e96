#!/usr/bin/env bash
# The main job, end to end, on the embedded default (a local repository folder): a realistic disk as a
# ksc_inc overlay on a shared base, a full backup, 1% of the disk changed, an incremental backup that reads
# only what changed, both points restored and verified byte for byte with qemu-img compare.
# Needs only what it uses: qemu-img (qemu-utils) and mkfs.ext4 (e2fsprogs); no Ceph. On a checkout that is
# already set up (node_modules present, dist/ newer than src/) it builds nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
for tool in qemu-img:qemu-utils mkfs.ext4:e2fsprogs numfmt:coreutils python3:python3; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || need+=("${tool##*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 update -q
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${need[@]}" >/dev/null
  else
    echo "demo: please install: ${need[*]} (apt-get install -y ${need[*]})" >&2
    exit 1
  fi
fi
[ -d node_modules ] || npm ci --no-audit --no-fund --loglevel=error
# Build only when dist/ is missing or older than a source file (the native addon is optional).
if [ ! -f dist/cli/kscinc.cjs ] || [ -n "$(find src -newer dist/cli/kscinc.cjs -name '*.ts' -print -quit)" ]; then
  npm run build --silent
fi
work=${KSCINC_DEMO_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/kscinc-demo.XXXXXX")}
mkdir -p "$work"
k() { node dist/cli/kscinc.cjs "$@"; }
step() { printf '\n== %s\n' "$*"; }
t0=$(date +%s.%N)
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "   (%.2f s)\n", b - a }'; }

step "1. base image: a 512 MiB ext4 disk full of real files (shared, read-only from now on)"
s=$(date +%s.%N); bash scripts/make-test-image.sh "$work/base.raw" 512M; elapsed "$s"

step "2. the VM's disk: a ksc_inc overlay on the base; the VM's first writes land in the overlay"
k create "$work/vm.ksc" --backing "$work/base.raw"
offset=$((100 * 1024 * 1024))
for f in /usr/bin/node /usr/bin/bash; do
  [ -f "$f" ] && k write "$work/vm.ksc" "$offset" --from "$f"
  offset=$((offset + 150 * 1024 * 1024 + 12345))
done
echo "overlay file: $(du -h "$work/vm.ksc" | cut -f1) on disk for a $(du -h --apparent-size "$work/base.raw" | cut -f1) disk"

step "3. first backup into a new local repository, encrypted (the default); no bitmap yet, so it is full"
# The repository's password: yours when KSCINC_PASSWORD_FILE or KSCINC_PASSWORD_COMMAND is set, else a
# random one in a private file of the demo's folder (never on a command line).
if [ -z "${KSCINC_PASSWORD_FILE:-}" ] && [ -z "${KSCINC_PASSWORD_COMMAND:-}" ]; then
  (umask 077; head -c 24 /dev/urandom | base64 > "$work/password")
  export KSCINC_PASSWORD_FILE="$work/password"
  echo "   password: a random one in $work/password (KSCINC_PASSWORD_FILE; --no-encrypt would make a plain repository)"
fi
k backup "$work/vm.ksc" --repo "$work/repo" --json > "$work/b1.json"
k convert "$work/vm.ksc" "$work/point1.raw" -O raw >/dev/null   # what backup 1 must restore to
node -e 'const r=require(process.argv[1]); console.log(`   ${r.full?"full":"incremental"} backup ${r.id}: read ${(r.bytesRead/1048576).toFixed(1)} MiB, stored ${(r.bytesStored/1048576).toFixed(1)} MiB, ${(r.durationMs/1000).toFixed(2)} s${r.fullReason?` (${r.fullReason})`:""}`)' "$work/b1.json"

step "4. the VM changes 1% of the disk: 5 MiB of new data at random places"
head -c $((5 * 1024 * 1024)) /dev/urandom > "$work/change.bin"
for i in 0 1 2 3 4; do
  dd if="$work/change.bin" of="$work/piece.bin" bs=1M skip="$i" count=1 status=none
  k write "$work/vm.ksc" $(( (RANDOM * 32768 + RANDOM) % 500 * 1024 * 1024 + i * 4096 )) --from "$work/piece.bin" >/dev/null
done
k bitmap show "$work/vm.ksc" backup | tail -n 2

step "5. incremental backup: only the chunks the dirty bitmap marks are read"
k backup "$work/vm.ksc" --repo "$work/repo" --json > "$work/b2.json"
k convert "$work/vm.ksc" "$work/point2.raw" -O raw >/dev/null
node -e 'const r=require(process.argv[1]); console.log(`   ${r.full?"full":"incremental"} backup ${r.id}: read ${(r.bytesRead/1048576).toFixed(1)} MiB of ${(r.size/1048576).toFixed(0)} MiB, stored ${(r.bytesStored/1048576).toFixed(1)} MiB, ${(r.durationMs/1000).toFixed(2)} s`)' "$work/b2.json"
k backups --repo "$work/repo"

step "6. restore both points and verify each byte for byte"
id1=$(node -p 'require(process.argv[1]).id' "$work/b1.json")
id2=$(node -p 'require(process.argv[1]).id' "$work/b2.json")
s=$(date +%s.%N); k restore "$id1" "$work/restored1.raw" --repo "$work/repo"; elapsed "$s"
qemu-img compare -f raw -F raw "$work/restored1.raw" "$work/point1.raw"
s=$(date +%s.%N); k restore "$id2" "$work/restored2.raw" --repo "$work/repo"; elapsed "$s"
qemu-img compare -f raw -F raw "$work/restored2.raw" "$work/point2.raw"

step "7. verify the repository (every chunk re-read and checked) and the image"
k verify --repo "$work/repo"
k check "$work/vm.ksc" --verify
echo "repository: $(du -sh "$work/repo" | cut -f1) for 2 backups of a $(du -h --apparent-size "$work/base.raw" | cut -f1) disk"

printf '\nall steps passed; files in %s\n' "$work"; elapsed "$t0"
