#!/bin/bash
# One pass of 100k 4 KiB writes at QD32 (`qemu-img bench -w -t none -c 100000 -d 32 -s 4096`) into a new
# 1 GiB image, served by `kscinc serve` (ksc_inc) or qemu-nbd (qcow2), on a unix socket. Prints the wall
# time, and the serving process's CPU seconds (user + system) and context switches during the pass, split
# into its main thread and the rest (libuv's pool, V8's helpers): figures that hold at any load.
# Alternate builds (and qemu-nbd) pass by pass to compare them under the same load:
#   for i in 1 2 3; do bench/nbd-write-threads.sh OLD/dist/cli/kscinc.cjs; bench/nbd-write-threads.sh dist/cli/kscinc.cjs; bench/nbd-write-threads.sh - qemu; done
# STRACE=1 adds `strace -c -f` of the serving process (its counts in $WORK/strace.txt), PERF=1 a perf record.
set -e
CLI=$1; MODE=${2:-ours}; W=${WORK:-/tmp/nbd-write-threads}; mkdir -p $W; rm -f $W/a.ksc $W/a.sock $W/a.qcow2
if [ "$MODE" = qemu ]; then
  qemu-img create -q -f qcow2 $W/a.qcow2 1073741824
  qemu-nbd --persistent --shared=8 --socket $W/a.sock -f qcow2 $W/a.qcow2 & SP=$!
else
  node "$CLI" create $W/a.ksc --size 1073741824 >/dev/null
  node "$CLI" serve $W/a.ksc --socket $W/a.sock > $W/serve.log 2>&1 & SP=$!
fi
for i in $(seq 100); do [ -S $W/a.sock ] && break; sleep 0.1; done
sleep 4 # the supervisor's spare worker has started: not counted
if [ "$MODE" = qemu ]; then WP=$SP; else WP=$(ps -o pid=,comm= --ppid $SP | awk '$2=="node"{print $1}'); fi
snap() { for t in /proc/$WP/task/*; do echo "$(basename $t) $(awk '{print $2, $14+$15}' $t/stat) $(awk '/ctxt/{s+=$2} END{print s}' $t/status)"; done; }
snap > $W/s0
STP=
[ -n "$STRACE" ] && { strace -c -f -p $WP -o $W/strace.txt & STP=$!; sleep 1; }
[ -n "$PERF" ] && { perf record -F 999 -g -o $W/perf.data -p $WP 2>/dev/null & STP=$!; sleep 1; }
qemu-img bench -f raw -c 100000 -d 32 -s 4096 -w -t none "nbd+unix:///?socket=$W/a.sock" | grep Run | tr '\n' ' '
[ -n "$STP" ] && { kill -INT $STP; wait $STP 2>/dev/null || true; }
snap > $W/s1
join $W/s0 $W/s1 | awk -v wp=$WP '{d=$6-$3; k=($1==wp)?"main":"other"; cs[k]+=$7-$4; if (d>0) {n[k]+=d; tot+=d}} END {for (k in n) printf "%s %.2f s %d cs  ", k, n[k]/100, cs[k]; printf "total %.2f s  ", tot/100}'
echo "load $(cut -d' ' -f1-3 /proc/loadavg)"
kill $SP; wait $SP 2>/dev/null || true
