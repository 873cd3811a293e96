#!/usr/bin/env bash
# Installs what the QEMU guest tests need (scripts/guest-kit.mjs), when missing: qemu-system-x86 (without
# recommends: about 20 small packages), busybox-static, and a Debian cloud kernel. The kernel package is
# not installed but unpacked into /opt/kscinc-guest (vmlinuz and its modules only): installing it would pull
# systemd, udev and initramfs-tools and build an initramfs for this machine, none of which the guest uses.
# Run as root (scripts/setup.sh calls it); as another user it only says what is missing.
set -euo pipefail
root=${KSCINC_GUEST_ROOT:-/opt/kscinc-guest}
kernel_pkg=${KSCINC_GUEST_KERNEL_PKG:-linux-image-cloud-amd64}
need=()
command -v qemu-system-x86_64 >/dev/null 2>&1 || need+=(qemu-system-x86)
dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed' || need+=(busybox-static)
have_kernel=
for k in "$root"/boot/vmlinuz-* /boot/vmlinuz-*; do
  [ -e "$k" ] || continue
  v=${k##*/vmlinuz-}
  [ -d "${k%/boot/*}/lib/modules/$v/kernel" ] && have_kernel=$k && break
done
[ ${#need[@]} -eq 0 ] && [ -n "$have_kernel" ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "guest-install: missing ${need[*]} ${have_kernel:-a kernel in $root}; run scripts/guest-install.sh as root" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get -o DPkg::Lock::Timeout=600 update -q >/dev/null
[ ${#need[@]} -eq 0 ] || apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${need[@]}" >/dev/null
if [ -z "$have_kernel" ]; then
  # The versioned package the meta-package points at (e.g. linux-image-6.1.0-57-cloud-amd64).
  pkg=$(apt-cache depends "$kernel_pkg" | awk '/Depends: linux-image-/ { print $2; exit }')
  [ -n "$pkg" ] || { echo "guest-install: cannot resolve $kernel_pkg to a kernel package" >&2; exit 1; }
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  chmod 755 "$tmp"
  (cd "$tmp" && chown _apt "$tmp" 2>/dev/null; apt-get download -q "$pkg" >/dev/null)
  mkdir -p "$tmp/x"
  dpkg-deb --fsys-tarfile "$tmp"/*.deb | tar -x -C "$tmp/x" --wildcards './boot/vmlinuz-*' './boot/config-*' './lib/modules/*'
  rm -rf "$root.new" && mv "$tmp/x" "$root.new"
  chmod -R a+rX "$root.new"
  rm -rf "$root.old"
  [ ! -e "$root" ] || mv "$root" "$root.old"
  mv "$root.new" "$root" && rm -rf "$root.old"
fi
