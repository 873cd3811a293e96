#!/usr/bin/env bash
# Every row of issue 19 in one run, each beside its peer (and an older build where the bench takes one), for
# the table the issue asks for ("every row before and after in one table"). Each step writes its own log in
# OUT; the load average is logged between steps (wall times at a load above 2 on 2 cores are noise: the steps
# print CPU figures too). Run from the repository's root after `npm run build`.
#
#   bash bench/issue19.sh --image /tmp/bench-img/test-1g.raw --old /tmp/old/dist/cli/kscinc.cjs [--out DIR]
#        [--steps nbd,races,cli,startup,restore,chunks] [--passes 5]
#
# Steps (about 35 min in all on the 1 GiB image; each can run alone with --steps):
#   nbd      bench/nbd-ab.mjs: every NBD row (sequential read/write 1 and 4 connections with nbdcopy, random 4 KiB
#            reads and writes at QD32 with qemu-img bench, overlay reads) for old, new and qemu-nbd, interleaved
#   races    bench/run.mjs --only convert,seq,rand,bitmap,backup,restore: library and CLI rows against qemu-img,
#            raw files, lz4 -1 and cp (image writes with one bitmap and checksums: races 3 and 4)
#   cli      bench/cli-ab.mjs --rows convert,incr: the CLI convert and small incremental, old and new alternated
#   startup  bench/startup.mjs: `kscinc --version` and commands' start-up over `node -e 0`, old beside new
#   restore  bench/restore-user.mjs: restore as a user waits (cold, until durable) against cp --sparse=always
#   chunks   bench/chunk-size.mjs: the 64 KiB / 256 KiB / 1 MiB table (full vs lz4, restore vs cp, sizes per
#            TiB, peak RSS, the scattered-1 % incremental's bytes read and stored)
set -euo pipefail
cd "$(dirname "$0")/.."

image='' old='' out="/tmp/issue19-$(date +%Y%m%d-%H%M)" steps='nbd,races,cli,startup,restore,chunks' passes=5
while [ $# -gt 0 ]; do
  case "$1" in
    --image) image=$2; shift 2 ;;
    --old) old=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --passes) passes=$2; shift 2 ;;
    *) echo "issue19.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -n "$image" ] && [ -f "$image" ] || { echo 'issue19.sh: --image RAW (a raw disk image, e.g. from /work/shared/make-test-image.sh) is required' >&2; exit 2; }
[ -n "$old" ] && [ -f "$old" ] || { echo 'issue19.sh: --old OLD/dist/cli/kscinc.cjs (an earlier build) is required' >&2; exit 2; }
new=dist/cli/kscinc.cjs
mkdir -p "$out"
echo "issue19.sh: logs in $out; new = $(git rev-parse --short HEAD)$(git diff --quiet || echo '+changes'), old = $old"

step() { # NAME COMMAND...: runs one step, its output in OUT/NAME.log, the load before and after
  local name=$1; shift
  case ",$steps," in *",$name,"*) ;; *) return 0 ;; esac
  { echo "# $(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg)"; echo "# $*"; } > "$out/$name.log"
  local t0=$SECONDS rc=0
  "$@" >> "$out/$name.log" 2>&1 || rc=$?
  echo "# $(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg) rc=$rc $((SECONDS - t0)) s" >> "$out/$name.log"
  echo "$name: rc=$rc, $((SECONDS - t0)) s, $(tail -1 "$out/$name.log" | cut -c3-)"
}

step nbd node bench/nbd-ab.mjs --image "$image" --passes "$passes" \
  --rows read1,read4,rand,write1,write4,randw,ov1,ov4 --side "old=$old" --side "new=$new"
step races node bench/run.mjs --reps 3 --image "$image" --only convert,seq,rand,bitmap,backup,restore
git checkout -q -- bench/results/latest.json 2>/dev/null || true
step cli node bench/cli-ab.mjs --image "$image" --old "$old" --passes "$passes" --rows convert,incr --chunk-size 256K
step startup node bench/startup.mjs --reps 20 --modes bundle --peer "$old" --only version,'backup --help','serve --help',info
step restore node bench/restore-user.mjs --passes "$passes" --chunks 256K --modes plain --sides raw,ksc
step chunks node bench/chunk-size.mjs --sizes 64K,256K,1M --reps 3 --image "$image"
echo "issue19.sh: done; logs in $out"
