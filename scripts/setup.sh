#!/usr/bin/env bash
# Sets up a fresh Debian machine for kscinc: the Debian tools the demo and tests use (when run as root and
# missing; Ceph for the S3 tests; QEMU and a guest kernel for the guest tests), the npm dependencies, the
# native addon and the TypeScript build.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
for tool in qemu-img:qemu-utils nbdinfo:libnbd-bin mkfs.ext4:e2fsprogs lz4:lz4 openssl:openssl script:bsdutils; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || need+=("${tool##*:}")
done
# openssl makes the TLS tests' certificates (test/helpers/pki.ts); script (bsdutils) gives the password prompt test a pty.
# liblz4's headers: the native addon then compresses with liblz4 itself (about twice lz4-napi's speed).
[ -f /usr/include/lz4.h ] || need+=(liblz4-dev)
[ -f /usr/include/libdeflate.h ] || need+=(libdeflate-dev)
# The S3 tests run against a real single-node Ceph RGW (scripts/ceph-rgw.sh): no mgr needed.
need_ceph=()
for tool in ceph-mon:ceph-mon ceph-osd:ceph-osd radosgw:radosgw ceph:ceph-common uuidgen:uuid-runtime curl:curl flock:util-linux fallocate:util-linux; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || need_ceph+=("${tool##*:}")
done
if [ $((${#need[@]} + ${#need_ceph[@]})) -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update -q
    [ ${#need[@]} -eq 0 ] || apt-get -o DPkg::Lock::Timeout=600 install -y -q "${need[@]}" >/dev/null
    [ ${#need_ceph[@]} -eq 0 ] || apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${need_ceph[@]}" >/dev/null
  else
    echo "setup: please install: ${need[*]} ${need_ceph[*]} (apt-get install -y ${need[*]} ${need_ceph[*]})" >&2
    exit 1
  fi
fi
# The QEMU guest of the interop tests: qemu-system-x86, busybox-static and a kernel under /opt/kscinc-guest.
scripts/guest-install.sh
npm ci --no-audit --no-fund --loglevel=error
npm run build --silent
