#!/bin/sh
# Full backup and restore of the same data, unencrypted vs encrypted, in one run (issue 20).
# Usage: bench/encrypt-roundtrip.sh [IMAGE] [PASSES]   (default: 256 MiB of generated data, 5 passes)
# Each pass backs up and restores into fresh repositories of three kinds, in a rotating order: plain
# (--no-encrypt), encrypted opened with a password (KSCINC_PASSWORD_FILE: each command runs scrypt, N = 32768,
# ~0.2 s of a core), and encrypted opened with a key file (no scrypt: the per-byte cost alone). It prints each
# pass's wall and CPU (user+sys) milliseconds and the load, then per-pass speed ratios (plain time /
# encrypted time: 1.0 = as fast; goal ≥ 0.9) as median [min–max], wall and CPU, for both encrypted kinds.
# MODES="plain pw" leaves the key file out.
set -e
K="node $(dirname "$0")/../dist/cli/kscinc.cjs"
T=$(mktemp -d /tmp/kscinc-encbench-XXXXXX); trap 'rm -rf "$T"' EXIT
IMG=${1:-$T/disk.raw}
PASSES=${2:-5}
MODES=${MODES:-plain pw key}
[ -n "$1" ] || node -e "const b=Buffer.alloc(256<<20);for(let i=0;i<b.length;i+=4096){b.write(('block '+i+' '+Math.random()).repeat(40),i)};require('fs').writeFileSync('$IMG',b)"
printf 'secret\n' > "$T/pw"
cat "$IMG" > /dev/null
# run NAME CMD...: appends "NAME wall_ms cpu_ms" to $T/log
run() { n=$1; shift; s=$(date +%s%N); /usr/bin/time -f '%U %S' -o "$T/t" "$@" >/dev/null; w=$(( ($(date +%s%N) - s) / 1000000 ))
  c=$(awk '{printf "%d", ($1+$2)*1000}' "$T/t"); echo "$n $w $c" >> "$T/log"; echo "$n $w ms (cpu $c)"; }
one() { # one KIND (plain|pw|key)
  r="$T/repo-$1"; out="$T/out-$1.raw"
  rm -rf "$r" "$out" "$T/key"
  case $1 in
    plain) $K repo init "$r" --no-encrypt >/dev/null; e=;;
    pw) KSCINC_PASSWORD_FILE="$T/pw" $K repo init "$r" --encrypt >/dev/null; e="KSCINC_PASSWORD_FILE=$T/pw";;
    key) $K repo init "$r" --key-file "$T/key" >/dev/null; e="KSCINC_KEY_FILE=$T/key";;
  esac
  run "backup-$1" env $e $K backup "$IMG" --repo "$r" --no-bitmap
  run "restore-$1" env $e $K restore latest "$out" --repo "$r"
  cmp "$IMG" "$out"; rm -rf "$out" "$r"
}
: > "$T/log"
i=1; while [ $i -le "$PASSES" ]; do
  line=$(for m in $MODES; do echo "$m"; done | awk -v r="$i" '{a[NR]=$0} END {for (j=0;j<NR;j++) printf "%s ", a[(j+r)%NR+1]}')
  printf 'pass %s (%s): %s load %s\n' "$i" "$line" "$(for m in $line; do one "$m"; done | tr '\n' ' ')" "$(cut -d' ' -f1 /proc/loadavg)"
  i=$((i+1))
done
MODES="$MODES" node -e '
const rows = require("fs").readFileSync(process.argv[1], "utf8").trim().split("\n").map((l) => l.split(" "));
const get = (n, f) => rows.filter((r) => r[0] === n).map((r) => Number(r[f]));
const med = (a) => { const s = [...a].sort((x, y) => x - y); return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2; };
const what = { pw: "password (scrypt per command)", key: "key file" };
for (const kind of process.env.MODES.split(/\s+/).filter((m) => m && m !== "plain"))
  for (const op of ["backup", "restore"]) for (const [f, unit] of [[1, "wall"], [2, "cpu"]]) {
    const p = get(op + "-plain", f), e = get(op + "-" + kind, f), r = p.map((x, i) => x / e[i]);
    console.log(`${op} ${unit}, ${what[kind]}: plain median ${med(p)} ms, encrypted median ${med(e)} ms; speed ratio median ${med(r).toFixed(2)} [${Math.min(...r).toFixed(2)}–${Math.max(...r).toFixed(2)}] (goal ≥ 0.9)`);
  }' "$T/log"
