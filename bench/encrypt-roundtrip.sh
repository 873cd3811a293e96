#!/bin/sh
# Full backup and restore of the same data, unencrypted vs encrypted, in one run (issue 20 step 5).
# Usage: bench/encrypt-roundtrip.sh IMAGE   (default: 256 MiB of compressible generated data)
set -e
K="node $(dirname "$0")/../dist/cli/kscinc.cjs"
T=$(mktemp -d /tmp/kscinc-encbench-XXXXXX); trap 'rm -rf "$T"' EXIT
IMG=${1:-$T/disk.raw}
[ -n "$1" ] || node -e "const b=Buffer.alloc(256<<20);for(let i=0;i<b.length;i+=4096){b.write(('block '+i+' '+Math.random()).repeat(40),i)};require('fs').writeFileSync('$IMG',b)"
printf 'secret\n' > "$T/pw"; export KSCINC_PASSWORD_FILE="$T/pw"
ms() { s=$(date +%s%N); "$@" >/dev/null; echo $(( ($(date +%s%N) - s) / 1000000 )); }
$K repo init "$T/plain" >/dev/null; $K repo init "$T/enc" --encrypt >/dev/null
bp=$(ms $K backup "$IMG" --repo "$T/plain" --no-bitmap); be=$(ms $K backup "$IMG" --repo "$T/enc" --no-bitmap)
rp=$(ms $K restore latest "$T/p.raw" --repo "$T/plain"); re=$(ms $K restore latest "$T/e.raw" --repo "$T/enc")
cmp "$IMG" "$T/p.raw"; cmp "$IMG" "$T/e.raw"
echo "backup: plain ${bp} ms, encrypted ${be} ms, speed ratio $(echo "scale=2; $bp/$be" | bc)"
echo "restore: plain ${rp} ms, encrypted ${re} ms, speed ratio $(echo "scale=2; $rp/$re" | bc)"
