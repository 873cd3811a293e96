# Helpers for kscinc guest scripts (sourced by /init; see scripts/guest-kit.mjs and test/helpers/guest.ts).
# Offsets and lengths are in MiB of /dev/vda. Results go to the serial console as `KSC-RESULT <name> <value>`.
# Scripts run with `set -e -o pipefail`: a failed read or write (EIO) ends the script with a non-zero status.
#
# The pattern of tag T (one letter) at a 4 KiB block of the disk with index B (its byte offset / 4096):
#   printf '%s%014d\n' T B   (16 bytes), then T repeated 4079 times, then '\n'   = 4096 bytes.
# test/helpers/guest.ts (guestPattern) makes the same bytes on the host.

ksc_result() {
  echo "KSC-RESULT $1 $2"
}

# ksc_pattern TAG OFF_MIB LEN_MIB: the pattern bytes on stdout.
ksc_pattern() {
  awk -v t="$1" -v s=$(($2 * 256)) -v n=$(($3 * 256)) 'BEGIN {
    f = t; while (length(f) < 4079) f = f f; f = substr(f, 1, 4079)
    for (i = 0; i < n; i++) printf "%s%014d\n%s\n", t, s + i, f
  }'
}

# ksc_write TAG OFF_MIB LEN_MIB: writes the pattern to /dev/vda and flushes it.
ksc_write() {
  ksc_pattern "$1" "$2" "$3" | dd of=/dev/vda bs=1M seek="$2" iflag=fullblock oflag=direct conv=fsync 2>/dev/null
}

# ksc_sha NAME OFF_MIB LEN_MIB: sha256 of a range, read past the page cache.
ksc_sha() {
  h=$(dd if=/dev/vda bs=1M skip="$2" count="$3" iflag=direct 2>/dev/null | sha256sum)
  ksc_result "$1" "${h%% *}"
}

# ksc_ms: milliseconds since boot (from /proc/uptime, 10 ms resolution).
ksc_ms() {
  awk '{ printf "%d\n", $1 * 1000 }' /proc/uptime
}

# ksc_readspeed NAME OFF_MIB LEN_MIB: sequential 1 MiB direct reads; prints the elapsed ms.
ksc_readspeed() {
  t0=$(ksc_ms)
  dd if=/dev/vda of=/dev/null bs=1M skip="$2" count="$3" iflag=direct 2>/dev/null
  ksc_result "$1" $(($(ksc_ms) - t0))
}

# ksc_size: the disk's size in bytes.
ksc_size() {
  ksc_result size "$(blockdev --getsize64 /dev/vda)"
}

# ksc_wait NAME: prints `KSC-WAIT NAME` and waits until the host writes the line NAME to the serial console
# (test/helpers/guest.ts: handle.waitFor(/^KSC-WAIT NAME/), then handle.send('NAME')).
ksc_wait() {
  echo "KSC-WAIT $1"
  while read -r line </dev/console; do
    [ "$line" = "$1" ] && return 0
  done
  echo "KSC-ERROR console closed while waiting for $1"
  return 1
}
