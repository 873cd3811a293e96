#!/usr/bin/env bash
# Sets up a fresh Debian machine for kscinc: the Debian tools the demo and tests use (when run as root and
# missing), the npm dependencies, the native addon and the TypeScript build.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
for tool in qemu-img:qemu-utils nbdinfo:libnbd-bin mkfs.ext4:e2fsprogs lz4:lz4; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || need+=("${tool##*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q "${need[@]}" >/dev/null
  else
    echo "setup: please install: ${need[*]} (apt-get install -y ${need[*]})" >&2
    exit 1
  fi
fi
npm ci --no-audit --no-fund --loglevel=error
npm run build --silent
