#!/usr/bin/env bash
# A throwaway single-node Ceph cluster (Debian bookworm packages, Pacific 16.2.x) with RADOS Gateways
# (S3) bound to 127.0.0.1 only: the real S3 server the objstore tests run against.
# 1 mon + (optional) 1 mgr + 1 OSD (bluestore on a sparse file, or memstore) + 1..n radosgw, pool size 1.
# No systemd, no cephadm, no containers: every daemon runs in the foreground (-f) under nohup and is
# tracked by PID in $CEPH_DIR/pids, so stopping never touches anything this script did not start.
#
#   ceph-rgw.sh install          apt-get install the packages (idempotent; needs root)
#   ceph-rgw.sh start            bring the cluster up (fresh if $CEPH_DIR has no cluster), print S3_* lines
#   ceph-rgw.sh stop             stop every daemon by PID (TERM, bounded wait, KILL), keep the data
#   ceph-rgw.sh destroy          stop (SIGKILL) + rm -rf $CEPH_DIR
#   ceph-rgw.sh status           ceph -s and the S3_* lines
#   ceph-rgw.sh stop-rgw [NAME]  stop only the gateway NAME (default a) with $RGW_STOP_SIGNAL (default KILL:
#                                a server dying, not a clean shutdown); the cluster keeps running
#   ceph-rgw.sh start-rgw [NAME] start the gateway NAME (default a), wait until it answers HTTP, print its
#                                S3_* lines. A new NAME is a second gateway on the same cluster and users,
#                                on port $RGW_PORT (remembered in $CEPH_DIR/rgw/NAME.port).
#
# Env: CEPH_DIR (default /tmp/ceph-rgw), RGW_PORT (default 7480), CEPH_MON_PORT (msgr2, default 3300),
#      CEPH_MON_PORT_V1 (default 6789), CEPH_STORE=bluestore|memstore (default bluestore),
#      CEPH_OSD_SIZE_GB (default 20, sparse), CEPH_OSD_MEMORY_TARGET (bytes, default 1 GiB),
#      CEPH_MGR=1|0 (default 1), S3_ACCESS_KEY, S3_SECRET_KEY, CEPH_WAIT (seconds per wait, default 120).
# Ports are fixed when the cluster is created and read back from $CEPH_DIR/ports afterwards.
set -euo pipefail
DIR="${CEPH_DIR:-/tmp/ceph-rgw}"
STORE="${CEPH_STORE:-bluestore}"
OSD_GB="${CEPH_OSD_SIZE_GB:-20}"
OSD_MEM="${CEPH_OSD_MEMORY_TARGET:-1073741824}"
WITH_MGR="${CEPH_MGR:-1}"
ACCESS="${S3_ACCESS_KEY:-cephlocalaccesskey}"
SECRET="${S3_SECRET_KEY:-cephlocalsecretkey0123456789}"
WAIT="${CEPH_WAIT:-120}"
ENV_RGW_PORT="${RGW_PORT:-}"
if [ -f "$DIR/ports" ]; then
  # shellcheck disable=SC1091
  . "$DIR/ports"
else
  RGW_PORT="${RGW_PORT:-7480}"; MON_V2="${CEPH_MON_PORT:-3300}"; MON_V1="${CEPH_MON_PORT_V1:-6789}"
fi
CONF="$DIR/ceph.conf"
C() { timeout 30 ceph -c "$CONF" "$@"; }
log() { echo "[ceph-rgw $(date +%T)] $*" >&2; }

install() {
  if command -v ceph-mon >/dev/null && command -v ceph-osd >/dev/null && command -v radosgw >/dev/null \
     && command -v uuidgen >/dev/null && command -v curl >/dev/null \
     && { [ "$WITH_MGR" = 0 ] || command -v ceph-mgr >/dev/null; }; then log "packages present"; return 0; fi
  [ "$(id -u)" = 0 ] || { log "not root: apt-get install ceph-mon ceph-osd radosgw ceph-common uuid-runtime curl"; return 1; }
  local pkgs=(ceph-mon ceph-osd radosgw ceph-common uuid-runtime curl)
  [ "$WITH_MGR" = 0 ] || pkgs+=(ceph-mgr)
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
}

wait_for() { # wait_for <desc> <daemon> <cmd...>; bounded by $WAIT seconds; fails fast if <daemon> died
  local desc="$1" d="$2"; shift 2; local t0=$SECONDS
  until "$@" >/dev/null 2>&1; do
    if (( SECONDS - t0 > WAIT )); then log "timeout waiting for $desc"; return 1; fi
    # only the daemon we wait for: a test may be killing another gateway right now
    if ! alive "$d"; then log "$d died; tail of its log:"; tail -5 "$DIR/log/$d.stdout" >&2; return 1; fi
    sleep 0.25
  done
  log "$desc ok after $((SECONDS - t0)) s"
}

daemon() { # daemon <name> <cmd...>: run in the foreground under nohup, record the PID
  local name="$1"; shift
  nohup "$@" >>"$DIR/log/$name.stdout" 2>&1 </dev/null &
  echo "$!" >"$DIR/pids/$name"
  log "started $name pid $!"
}
running() { # running <pid>: exists and is not a zombie waiting for init to reap it
  kill -0 "$1" 2>/dev/null && [ "$(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null)" != Z ]
}
alive() { [ -f "$DIR/pids/$1" ] && running "$(cat "$DIR/pids/$1")"; }

write_conf() {
  local fsid="$1"
  cat >"$CONF" <<EOF
[global]
fsid = $fsid
mon host = [v2:127.0.0.1:$MON_V2,v1:127.0.0.1:$MON_V1]
mon initial members = a
public addr = 127.0.0.1
cluster addr = 127.0.0.1
public network = 127.0.0.0/8
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = $DIR/keyring/\$name.keyring
run dir = $DIR/run
admin socket = $DIR/run/\$name.asok
log file = $DIR/log/\$name.log
crash dir = $DIR/crash
mon data = $DIR/mon/\$cluster-\$id
mgr data = $DIR/mgr/\$cluster-\$id
osd data = $DIR/osd/\$cluster-\$id
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon max pg per osd = 1000
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0
osd objectstore = $STORE
memstore device bytes = $((OSD_GB * 1024 * 1024 * 1024))
bluestore block path = $DIR/osd/osd0.block
bluestore block create = true
bluestore block size = $((OSD_GB * 1024 * 1024 * 1024))
osd memory target = $OSD_MEM
osd max object size = 134217728
debug ms = 0/0
auth allow insecure global id reclaim = false
# A killed radosgw leaves its watches on the control objects until they time out (default 30 s), and every
# metadata change (bucket creation) waits for them: tests kill gateways, so expire them fast.
osd client watch timeout = 6
objecter tick interval = 1
[client]
rgw data = $DIR/rgw/\$name
rgw enable usage log = false
rgw thread pool size = 128
# deleted objects' tails are garbage-collected lazily (default: after 2 h); shorten for a local target
rgw gc obj min wait = 300
rgw gc processor period = 300
EOF
}

bootstrap() {
  log "bootstrapping new cluster in $DIR (store=$STORE, mon ports $MON_V2/$MON_V1, rgw port $RGW_PORT)"
  mkdir -p "$DIR"/{keyring,run,log,crash,mon,mgr/ceph-x,osd/ceph-0,rgw,pids}
  printf 'RGW_PORT=%s\nMON_V2=%s\nMON_V1=%s\n' "$RGW_PORT" "$MON_V2" "$MON_V1" >"$DIR/ports"
  echo "$RGW_PORT" >"$DIR/rgw/a.port"
  local fsid; fsid=$(uuidgen)
  write_conf "$fsid"
  ceph-authtool --create-keyring "$DIR/keyring/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
  ceph-authtool --create-keyring "$DIR/keyring/client.admin.keyring" --gen-key -n client.admin \
    --cap mon 'allow *' --cap osd 'allow *' --cap mds 'allow *' --cap mgr 'allow *' >/dev/null
  cp "$DIR/keyring/mon.keyring" "$DIR/keyring/mon-mkfs.keyring"
  ceph-authtool "$DIR/keyring/mon-mkfs.keyring" --import-keyring "$DIR/keyring/client.admin.keyring" >/dev/null
  monmaptool --create --addv a "[v2:127.0.0.1:$MON_V2,v1:127.0.0.1:$MON_V1]" --fsid "$fsid" "$DIR/monmap" >/dev/null
  ceph-mon -c "$CONF" --mkfs -i a --monmap "$DIR/monmap" --keyring "$DIR/keyring/mon-mkfs.keyring" || return 1
  touch "$DIR/.bootstrapped-mon"
}

start_mon() { alive mon.a || daemon mon.a ceph-mon -c "$CONF" -f -i a; wait_for "mon quorum" mon.a C mon stat; }
start_mgr() {
  [ "$WITH_MGR" = 1 ] || return 0
  [ -s "$DIR/keyring/mgr.x.keyring" ] || C auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' mds 'allow *' -o "$DIR/keyring/mgr.x.keyring"
  alive mgr.x || daemon mgr.x ceph-mgr -c "$CONF" -f -i x
}
start_osd() {
  if [ ! -f "$DIR/osd/ceph-0/.mkfs-done" ]; then
    local uuid; uuid=$(uuidgen)
    local id; id=$(C osd new "$uuid") || return 1
    [ "$id" = 0 ] || { log "unexpected osd id $id"; return 1; }
    C auth get-or-create osd.0 mon 'allow profile osd' mgr 'allow profile osd' osd 'allow *' -o "$DIR/keyring/osd.0.keyring" || return 1
    ceph-osd -c "$CONF" -i 0 --mkfs --osd-uuid "$uuid" >>"$DIR/log/osd-mkfs.log" 2>&1 \
      || { log "osd mkfs failed:"; tail -3 "$DIR/log/osd-mkfs.log" >&2; return 1; }
    touch "$DIR/osd/ceph-0/.mkfs-done"
  fi
  alive osd.0 || daemon osd.0 ceph-osd -c "$CONF" -f -i 0
  wait_for "osd.0 up" osd.0 bash -c "timeout 30 ceph -c '$CONF' osd dump | grep -q '^osd.0 up'"
}

rgw_port() { # the port of gateway $1: remembered, or $RGW_PORT for a new one
  local f="$DIR/rgw/$1.port"
  [ -s "$f" ] || echo "${RGW_PORT_NEW:-$RGW_PORT}" >"$f"
  cat "$f"
}
start_rgw() { # start_rgw <name>: start one gateway (if not running) and wait until it answers HTTP
  local name="$1" port; port=$(rgw_port "$name")
  mkdir -p "$DIR/rgw/client.rgw.$name"
  [ -s "$DIR/keyring/client.rgw.$name.keyring" ] || C auth get-or-create "client.rgw.$name" mon 'allow rw' osd 'allow rwx' mgr 'allow rw' -o "$DIR/keyring/client.rgw.$name.keyring"
  # tcp_nodelay=1: with Nagle on, every response with a body waits ~40 ms for the client's delayed ACK.
  # A gateway restarted right after a SIGKILL may find its port still held while the old process is torn down
  # (slow on a loaded machine; CI saw a restart die at once): a start that dies is tried twice more.
  local try
  for try in 1 2 3; do
    alive "rgw.$name" || daemon "rgw.$name" radosgw -c "$CONF" -f -n "client.rgw.$name" --rgw-frontends "beast endpoint=127.0.0.1:$port tcp_nodelay=1"
    if wait_for "radosgw $name http on 127.0.0.1:$port" "rgw.$name" curl -s -o /dev/null -m 2 "http://127.0.0.1:$port/"; then return 0; fi
    alive "rgw.$name" && return 1 # answered nothing in time, yet runs: not a start that died
    [ "$try" = 3 ] || { log "radosgw $name died while starting (try $try); again in 2 s"; sleep 2; }
  done
  return 1
}
ensure_user() {
  if ! timeout 60 radosgw-admin -c "$CONF" user info --uid=s3local >/dev/null 2>&1; then
    timeout 60 radosgw-admin -c "$CONF" user create --uid=s3local --display-name="local s3" \
      --access-key="$ACCESS" --secret-key="$SECRET" >/dev/null
    log "created rgw user s3local"
  fi
}
load_keys() {
  if [ -f "$DIR/s3keys" ]; then ACCESS=$(sed -n 1p "$DIR/s3keys"); SECRET=$(sed -n 2p "$DIR/s3keys"); fi
}
env_out() { # env_out [name]
  local port; port=$(rgw_port "${1:-a}")
  load_keys
  echo "S3_ENDPOINT=http://127.0.0.1:$port"
  echo "S3_HOST=127.0.0.1"
  echo "S3_PORT=$port"
  echo "S3_ACCESS_KEY=$ACCESS"
  echo "S3_SECRET_KEY=$SECRET"
  echo "S3_REGION=us-east-1"
  echo "S3_PID=$(cat "$DIR"/pids/* 2>/dev/null | paste -sd, -)"
}
start() {
  command -v ceph-mon >/dev/null || { log "ceph not installed: run '$0 install'"; return 1; }
  local t0=$SECONDS
  [ -f "$DIR/.bootstrapped-mon" ] || bootstrap || { log "bootstrap failed"; return 1; }
  load_keys
  (umask 077; printf '%s\n%s\n' "$ACCESS" "$SECRET" >"$DIR/s3keys")
  start_mon && start_mgr && start_osd && start_rgw a && ensure_user || { log "start failed; see $DIR/log"; stop; return 1; }
  log "cluster up in $((SECONDS - t0)) s"
  env_out a
}
stop_one() { # stop_one <daemon> <signal>
  local n="$1" sig="$2" pid i
  [ -f "$DIR/pids/$n" ] || return 0
  pid=$(cat "$DIR/pids/$n")
  if running "$pid"; then
    kill "-$sig" "$pid"
    for i in $(seq 1 150); do running "$pid" || break; sleep 0.1; done   # 15 s
    if running "$pid"; then log "SIGKILL $n ($pid)"; kill -KILL "$pid"; fi
    log "stopped $n ($pid, SIG$sig)"
  fi
  rm -f "$DIR/pids/$n"
}
stop() { # stop [signal]: gateways first, the monitor last
  local f sig="${1:-TERM}"
  for f in "$DIR"/pids/rgw.*; do [ -f "$f" ] && stop_one "$(basename "$f")" "$sig"; done
  for f in osd.0 mgr.x mon.a; do stop_one "$f" "$sig"; done
}
need_cluster() { [ -f "$DIR/.bootstrapped-mon" ] || { log "no cluster in $DIR"; exit 1; }; }
case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  destroy) stop KILL; rm -rf "$DIR" ;;   # the data goes anyway: no clean shutdown needed
  status) C -s; env_out a ;;
  stop-rgw) need_cluster; stop_one "rgw.${2:-a}" "${RGW_STOP_SIGNAL:-KILL}" ;;
  start-rgw) need_cluster; RGW_PORT_NEW="$ENV_RGW_PORT"; [ "${2:-a}" = a ] || [ -n "$RGW_PORT_NEW" ] || [ -s "$DIR/rgw/${2}.port" ] \
      || { log "a new gateway needs RGW_PORT"; exit 2; }
    start_rgw "${2:-a}"; env_out "${2:-a}" ;;
  *) echo "usage: $0 install|start|stop|destroy|status|stop-rgw [NAME]|start-rgw [NAME]" >&2; exit 2 ;;
esac
