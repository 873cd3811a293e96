#!/bin/bash
# Instructions per pass of 100k random 4 KiB reads at QD32 (`qemu-img bench -c 100000 -d 32 -s 4096 -S 1MiB+4KiB`,
# the rand row of bench/nbd-ab.mjs) of a raw image served read-only, counted by callgrind per thread (a figure that
# does not move with the machine's load): `kscinc serve --no-supervisor IMG --read-only` (node --perf-basic-prof so
# that JIT code can be named) or qemu-nbd (raw). The image is read once before (page cache warm).
# Counters are zeroed once the server listens and dumped when the pass ends; the summary is the serving thread's
# (callgrind.out.PID.1-01), by object and by function (bench/callgrind-self.mjs).
#   bench/nbd-read-callgrind.sh dist/cli/kscinc.cjs IMG        bench/nbd-read-callgrind.sh - IMG qemu
# STRACE=1: instead of callgrind, `strace -c -f` of the server over the same pass (system calls per 100k reads).
# As in nbd-write-callgrind.sh: under valgrind the client always has its 32 requests queued; compare builds with
# each other and with qemu-nbd in this mode only.
set -e
CLI=$1; IMG=$2; MODE=${3:-ours}; N=${COUNT:-100000}; W=${WORK:-/tmp/nbd-read-callgrind}; mkdir -p $W
rm -f $W/a.sock $W/callgrind.out.* $W/strace.out
cat "$IMG" > /dev/null
if [ -n "$STRACE" ]; then RUN="strace -c -f -o $W/strace.out"; else RUN="valgrind --tool=callgrind --separate-threads=yes --callgrind-out-file=$W/callgrind.out.%p"; fi
if [ "$MODE" = qemu ]; then
  $RUN qemu-nbd --persistent --shared=8 --read-only --socket $W/a.sock -f raw "$IMG" > $W/serve.log 2>&1 & SP=$!
else
  $RUN node --perf-basic-prof "$CLI" serve --no-supervisor "$IMG" --read-only --socket $W/a.sock > $W/serve.log 2>&1 & SP=$!
fi
for i in $(seq ${WAIT:-600}); do [ -S $W/a.sock ] && break; sleep 0.1; done  # WAIT: tenths of a second for the server to listen
sleep 2
[ -z "$STRACE" ] && callgrind_control -z $SP >/dev/null 2>&1
qemu-img bench -f raw -c $N -d 32 -s 4096 -S $((1048576 + 4096)) "nbd+unix:///?socket=$W/a.sock" | grep Run | tr '\n' ' '
[ -z "$STRACE" ] && callgrind_control -d $SP >/dev/null 2>&1
echo "load $(cut -d' ' -f1-3 /proc/loadavg)"
# strace passes SIGINT on to nobody: the traced server (its child) is stopped by its own id.
if [ -n "$STRACE" ]; then kill -INT $(pgrep -P $SP | head -1); else kill -INT $SP; fi; wait $SP 2>/dev/null || true
if [ -n "$STRACE" ]; then head -30 $W/strace.out; exit 0; fi
node "$(dirname "$0")/callgrind-self.mjs" $W/callgrind.out.$SP.1-01 /tmp/perf-$SP.map 40
