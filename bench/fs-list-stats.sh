#!/bin/sh
# Stats a folder store's listing takes (FsStore.list('packs/')), counted with strace, of one build:
#   bench/fs-list-stats.sh BUILD [WORK]   (BUILD: a worktree or copy with dist/ built; WORK: a scratch folder)
# Three repositories of the same 1000 packs (seeded names, 100 bytes each): plain folders and files; every
# packs/XX folder a symbolic link to a folder elsewhere; every pack a symbolic link to a file elsewhere.
# Prints, for each, the statx/newfstatat calls naming a path inside the repository (counts do not depend
# on the machine's load). Session 24: 1256 / 1509 / 2256 before the listing took one stat per link, 1256 / 1256 / 1256 after.
set -e
BUILD=$(cd "$1" && pwd)
WORK=${2:-/tmp/kscinc-fs-list-stats}
if [ ! -d "$WORK/plain" ]; then
  mkdir -p "$WORK"
  python3 - "$WORK" <<'PY'
import os, random, sys
w = sys.argv[1]
random.seed(24)
for i in ['%032x' % random.getrandbits(128) for _ in range(1000)]:
    for root, mode in (('plain', 'plain'), ('linked', 'dirs'), ('filelinks', 'files')):
        if mode == 'plain':
            d = f'{w}/{root}/packs/{i[:2]}'; os.makedirs(d, exist_ok=True); open(f'{d}/{i}.pack', 'wb').write(b'x' * 100)
        elif mode == 'dirs':
            d = f'{w}/elsewhere/packs/{i[:2]}'; os.makedirs(d, exist_ok=True); open(f'{d}/{i}.pack', 'wb').write(b'x' * 100)
            os.makedirs(f'{w}/{root}/packs', exist_ok=True)
            l = f'{w}/{root}/packs/{i[:2]}'
            if not os.path.islink(l): os.symlink(d, l)
        else:
            d = f'{w}/filestore/{i[:2]}'; os.makedirs(d, exist_ok=True); open(f'{d}/{i}.pack', 'wb').write(b'x' * 100)
            d2 = f'{w}/{root}/packs/{i[:2]}'; os.makedirs(d2, exist_ok=True); os.symlink(f'{d}/{i}.pack', f'{d2}/{i}.pack')
PY
fi
cat > "$WORK/list.mjs" <<'JS'
const { FsStore } = await import(process.argv[2] + '/dist/objstore/fs.js');
const s = await FsStore.open(process.argv[3]);
let n = 0;
for await (const o of s.list('packs/')) n++;
if (n !== 1000) throw new Error(`listed ${n} packs, not 1000`);
JS
for r in plain linked filelinks; do
  strace -f -e trace=statx,newfstatat -o "$WORK/trace.txt" node "$WORK/list.mjs" "$BUILD" "$WORK/$r"
  echo "$r: $(grep -c "stat[a-z]*(.*$WORK/$r" "$WORK/trace.txt") stats of the repository's paths"
done
