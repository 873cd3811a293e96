#!/usr/bin/env bash
# The main job, end to end, on the embedded default (local files): a realistic base disk, an overlay that
# takes a VM's writes, its dirty bitmap and map, and a conversion back to raw verified byte for byte
# against the same writes applied to a copy of the base.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
work=${KSCINC_DEMO_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/kscinc-demo.XXXXXX")}
mkdir -p "$work"
k() { node dist/cli/kscinc.cjs "$@"; }
step() { printf '\n== %s\n' "$*"; }
t0=$(date +%s.%N)
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "   (%.2f s)\n", b - a }'; }

step "1. base image: a 512 MiB ext4 disk full of real files (shared, read-only from now on)"
s=$(date +%s.%N); bash scripts/make-test-image.sh "$work/base.raw" 512M; elapsed "$s"

step "2. the VM's disk: a ksc_inc overlay on the base, with a dirty bitmap for the next backup"
k create "$work/vm.ksc" --backing "$work/base.raw"
k bitmap add "$work/vm.ksc" backup

step "3. the VM writes: 3 files' worth of data at three places (through the library, as the NBD server will)"
cp "$work/base.raw" "$work/expected.raw"
s=$(date +%s.%N)
offset=$((100 * 1024 * 1024))
for f in /usr/bin/node /usr/bin/bash /usr/bin/git; do
  [ -f "$f" ] || continue
  k write "$work/vm.ksc" "$offset" --from "$f"
  dd if="$f" of="$work/expected.raw" bs=1M seek="$offset" oflag=seek_bytes conv=notrunc status=none
  offset=$((offset + 150 * 1024 * 1024 + 12345))
done
elapsed "$s"

step "4. what the overlay holds: info, the dirty bitmap (what the next backup reads), the map"
k info "$work/vm.ksc"
k bitmap show "$work/vm.ksc" backup | tail -n 4
echo "map (depth 0 = the overlay, 1 = the base):"
k map "$work/vm.ksc" | awk 'NR==1 || $4=="0"' | head -n 12
echo "overlay file: $(du -h "$work/vm.ksc" | cut -f1) on disk for a $(du -h --apparent-size "$work/base.raw" | cut -f1) disk"

step "5. convert the whole chain back to raw and verify against the same writes applied to a copy of the base"
s=$(date +%s.%N); k convert "$work/vm.ksc" "$work/vm.raw" -O raw; elapsed "$s"
qemu-img compare -f raw -F raw "$work/vm.raw" "$work/expected.raw"

step "6. check the image, reading every block against its checksum"
k check "$work/vm.ksc" --verify

printf '\nall steps passed; files in %s\n' "$work"; elapsed "$t0"
