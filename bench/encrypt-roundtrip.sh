#!/bin/sh
# Full backup and restore of the same data, unencrypted vs encrypted, in one run (issue 20).
# Usage: bench/encrypt-roundtrip.sh [IMAGE] [PASSES]   (default: 256 MiB of generated data, 5 passes)
# KEY_FILE=1: the encrypted repository is opened with a key file instead of a password, which leaves out
# the per-command scrypt (N = 32768: ~0.15-0.2 s of CPU here), to tell that fixed cost from the per-byte one.
# Each pass backs up and restores into fresh repositories, plain and encrypted, alternating which goes
# first; it prints each pass's wall and CPU (user+sys) milliseconds, then per-pass speed ratios
# (plain time / encrypted time: 1.0 = as fast) as median [min–max].
set -e
K="node $(dirname "$0")/../dist/cli/kscinc.cjs"
T=$(mktemp -d /tmp/kscinc-encbench-XXXXXX); trap 'rm -rf "$T"' EXIT
IMG=${1:-$T/disk.raw}
PASSES=${2:-5}
[ -n "$1" ] || node -e "const b=Buffer.alloc(256<<20);for(let i=0;i<b.length;i+=4096){b.write(('block '+i+' '+Math.random()).repeat(40),i)};require('fs').writeFileSync('$IMG',b)"
printf 'secret\n' > "$T/pw"; export KSCINC_PASSWORD_FILE="$T/pw"
cat "$IMG" > /dev/null
# run NAME CMD...: appends "NAME wall_ms cpu_ms" to $T/log
run() { n=$1; shift; s=$(date +%s%N); /usr/bin/time -f '%U %S' -o "$T/t" "$@" >/dev/null; w=$(( ($(date +%s%N) - s) / 1000000 ))
  c=$(awk '{printf "%d", ($1+$2)*1000}' "$T/t"); echo "$n $w $c" >> "$T/log"; }
one() { # one KIND (plain|enc)
  rm -rf "$T/$1" "$T/$1.raw"
  if [ "$1" = enc ] && [ -n "${KEY_FILE:-}" ]; then rm -f "$T/key"; env -u KSCINC_PASSWORD_FILE $K repo init "$T/$1" --key-file "$T/key" >/dev/null
  elif [ "$1" = enc ]; then $K repo init "$T/$1" --encrypt >/dev/null; else $K repo init "$T/$1" --no-encrypt >/dev/null 2>&1 || $K repo init "$T/$1" >/dev/null; fi
  if [ "$1" = enc ] && [ -n "${KEY_FILE:-}" ]; then kf="KSCINC_KEY_FILE=$T/key"; else kf=; fi
  run "backup-$1" env $kf $K backup "$IMG" --repo "$T/$1" --no-bitmap
  run "restore-$1" env $kf $K restore latest "$T/$1.raw" --repo "$T/$1"
  cmp "$IMG" "$T/$1.raw"; rm -f "$T/$1.raw"
}
: > "$T/log"
i=1; while [ $i -le "$PASSES" ]; do
  if [ $((i % 2)) = 1 ]; then one plain; one enc; else one enc; one plain; fi
  echo "pass $i: $(tr '\n' ' ' < "$T/log" | awk '{for(i=NF-11;i<=NF;i+=3) printf "%s %s ms (cpu %s) ", $i, $(i+1), $(i+2)}') load $(cut -d' ' -f1 /proc/loadavg)"
  i=$((i+1))
done
node -e '
const rows = require("fs").readFileSync(process.argv[1], "utf8").trim().split("\n").map((l) => l.split(" "));
const get = (n, f) => rows.filter((r) => r[0] === n).map((r) => Number(r[f]));
const med = (a) => { const s = [...a].sort((x, y) => x - y); return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2; };
for (const op of ["backup", "restore"]) for (const [f, what] of [[1, "wall"], [2, "cpu"]]) {
  const p = get(op + "-plain", f), e = get(op + "-enc", f), r = p.map((x, i) => x / e[i]);
  console.log(`${op} ${what}: plain median ${med(p)} ms, encrypted median ${med(e)} ms; speed ratio median ${med(r).toFixed(2)} [${Math.min(...r).toFixed(2)}–${Math.max(...r).toFixed(2)}]`);
}' "$T/log"
