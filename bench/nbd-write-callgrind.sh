#!/bin/bash
# Instructions per pass of 100k 4 KiB writes at QD32 (`qemu-img bench -w -t none -c 100000 -d 32 -s 4096`) into a
# new 1 GiB image, counted by callgrind per thread (a figure that does not move with the machine's load):
# `kscinc serve --no-supervisor` (ksc_inc, node --perf-basic-prof so that JIT code can be named) or qemu-nbd (qcow2).
# Counters are zeroed once the server listens and dumped when the pass ends; the summary is the serving thread's
# (callgrind.out.PID.1-01), by object and by function (bench/callgrind-self.mjs).
#   bench/nbd-write-callgrind.sh dist/cli/kscinc.cjs        bench/nbd-write-callgrind.sh - qemu
# Under valgrind the server is ~50x slower, so the client always has its 32 requests queued: more of them are
# read per turn than on a real run. Compare builds with each other and with qemu-nbd in this mode only.
# memcpy/memset with `rep movsb/stosb` count one instruction per byte here (far more than they cost).
# STRACE=1: instead of callgrind, `strace -c -f` of the server over the same pass (system calls per 100k writes;
# the server's start is counted too).
set -e
CLI=$1; MODE=${2:-ours}; N=${COUNT:-100000}; W=${WORK:-/tmp/nbd-write-callgrind}; mkdir -p $W
rm -f $W/a.ksc $W/a.sock $W/a.qcow2 $W/callgrind.out.* $W/strace.out
VG="valgrind --tool=callgrind --separate-threads=yes --callgrind-out-file=$W/callgrind.out.%p"
[ -n "$STRACE" ] && VG="strace -c -f -o $W/strace.out"
if [ "$MODE" = qemu ]; then
  qemu-img create -q -f qcow2 $W/a.qcow2 1073741824
  $VG qemu-nbd --persistent --shared=8 --socket $W/a.sock -f qcow2 $W/a.qcow2 > $W/serve.log 2>&1 & SP=$!
else
  node "$CLI" create $W/a.ksc --size 1073741824 >/dev/null
  $VG node --perf-basic-prof "$CLI" serve --no-supervisor $W/a.ksc --socket $W/a.sock > $W/serve.log 2>&1 & SP=$!
fi
for i in $(seq ${WAIT:-600}); do [ -S $W/a.sock ] && break; sleep 0.1; done  # WAIT: tenths of a second for the server to listen (valgrind on a loaded machine)
sleep 2
# WARM=N: N untimed writes at 600 MiB first (N ≤ 100000) (a fresh server's JIT tiers up and compiles during its first writes;
# under valgrind, whose threads take turns, its baseline code runs far longer than on a real run).
[ -n "$WARM" ] && qemu-img bench -f raw -c $WARM -d 32 -s 4096 -w -t none -o 629145600 "nbd+unix:///?socket=$W/a.sock" >/dev/null
[ -z "$STRACE" ] && callgrind_control -z $SP >/dev/null 2>&1
qemu-img bench -f raw -c $N -d 32 -s 4096 -w -t none "nbd+unix:///?socket=$W/a.sock" | grep Run | tr '\n' ' '
[ -z "$STRACE" ] && callgrind_control -d $SP >/dev/null 2>&1
echo "load $(cut -d' ' -f1-3 /proc/loadavg)"
# strace passes SIGINT on to nobody: the traced server (its child) is stopped by its own id.
if [ -n "$STRACE" ]; then kill -INT $(pgrep -P $SP | head -1); else kill -INT $SP; fi; wait $SP 2>/dev/null || true
if [ -n "$STRACE" ]; then head -30 $W/strace.out; exit 0; fi
node "$(dirname "$0")/callgrind-self.mjs" $W/callgrind.out.$SP.1-01 /tmp/perf-$SP.map 40
# Every thread's count too (V8's compiler and GC threads, the libuv pool's writes).
echo "all threads: $(cat $W/callgrind.out.$SP.*-* | awk '/^summary:/ {s += $2} END {print s}') Ir"
