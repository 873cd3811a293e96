#!/bin/sh
# /init of the kscinc test guest (built by scripts/guest-kit.mjs): mounts proc, sys and dev, loads the
# virtio modules, waits for /dev/vda, runs the script QEMU hands over as fw_cfg file opt/kscinc/script with
# the helpers of /lib/ksc.sh, prints `KSC-EXIT <status>`, then powers off. Nothing here may wait unbounded.
export PATH=/bin
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# Kernel errors (an I/O error on vda) stay visible on the console; the boot chatter does not.
echo 4 >/proc/sys/kernel/printk
while read -r m; do
  insmod "/lib/modules/$m.ko" || echo "KSC-ERROR insmod $m"
done </etc/ksc-modules
i=0
while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do
  usleep 50000
  i=$((i + 1))
done
script=/sys/firmware/qemu_fw_cfg/by_name/opt/kscinc/script/raw
echo "KSC-BOOTED $(cut -d' ' -f1 /proc/uptime)"
if [ ! -b /dev/vda ]; then
  echo "KSC-ERROR no /dev/vda after 10 s"
  rc=124
elif [ ! -r $script ]; then
  echo "KSC-ERROR no script at fw_cfg opt/kscinc/script"
  rc=125
else
  cat $script >/tmp/script.sh
  (
    . /lib/ksc.sh
    set -e -o pipefail
    . /tmp/script.sh
  )
  rc=$?
fi
sync
echo "KSC-EXIT $rc"
poweroff -f
