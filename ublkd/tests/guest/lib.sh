# Helpers shared by the guest tests (sourced). They run as root inside the throw-away QEMU
# guest of `cargo xtask vm-test`: kernel 6.12 with ublk_drv and nbd, the host's / read-only
# under a tmpfs overlay, /tmp a fresh tmpfs. $UNIBLK_BIN holds ublkd and uniblk.
set -euo pipefail

: "${UNIBLK_BIN:?UNIBLK_BIN must name the directory holding ublkd and uniblk}"
TEST=${TEST:-$(basename "$0" .sh)}
W=/tmp/uniblk-$TEST
SOCK=$W/mgmt.sock
DLOG=$W/ublkd.log
DPID=

log() { echo "[$TEST] $*"; }

fail() {
    echo "[$TEST] FAIL: $*" >&2
    if [ -s "$DLOG" ]; then
        echo "[$TEST] --- last lines of the daemon log ($DLOG) ---" >&2
        tail -n 40 "$DLOG" >&2
    fi
    exit 1
}

# Run a command, failing the test with its output if it fails.
must() {
    local out
    if ! out=$("$@" 2>&1); then
        fail "'$*' failed:
$out"
    fi
}

setup() {
    rm -rf "$W"
    mkdir -p "$W/mnt"
    modprobe ublk_drv || fail "modprobe ublk_drv"
}

# members SIZE NAME... : sparse member files under $W; prints their addresses, TOML-quoted.
members() {
    local size=$1 out=() f
    shift
    for f in "$@"; do
        truncate -s "$size" "$W/$f.img"
        out+=("\"file:$W/$f.img\"")
    done
    local IFS=,
    echo "${out[*]}"
}

# layout NAME LEVEL MEMBERS EXTRA_TOML... : writes $W/layout.toml
layout() {
    local name=$1 level=$2 members=$3
    shift 3
    {
        echo '[[array]]'
        echo "name = \"$name\""
        echo "level = \"$level\""
        echo "members = [$members]"
        printf '%s\n' "$@"
    } >"$W/layout.toml"
}

start_daemon() {
    "$UNIBLK_BIN/ublkd" -c "$W/layout.toml" --mgmt-socket "$SOCK" >>"$DLOG" 2>&1 &
    DPID=$!
    local i
    for i in $(seq 600); do
        kill -0 "$DPID" 2>/dev/null || fail "ublkd exited during start-up"
        if "$UNIBLK_BIN/uniblk" status --json --socket "$SOCK" >"$W/status.json" 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    fail "ublkd did not answer on $SOCK within 60 s"
}

# The ublk device of the (only) array, from `uniblk status --json`.
ublk_dev() {
    "$UNIBLK_BIN/uniblk" status --json --socket "$SOCK" >"$W/status.json" || fail "uniblk status failed"
    local dev
    dev=$(grep -o '"device": *"/dev/ublkb[0-9]*"' "$W/status.json" | grep -o '/dev/ublkb[0-9]*' || true)
    [ -n "$dev" ] || fail "status shows no ublk device: $(cat "$W/status.json")"
    [ -b "$dev" ] || fail "$dev from status is not a block device"
    echo "$dev"
}

# status_has PATTERN : the status JSON contains PATTERN (extended regexp)
status_has() {
    "$UNIBLK_BIN/uniblk" status --json --socket "$SOCK" >"$W/status.json" || fail "status failed"
    grep -Eq "$1" "$W/status.json"
}

# Stop the daemon with SIGTERM; it must exit 0 within 60 s.
stop_daemon() {
    [ -n "$DPID" ] || return 0
    kill -TERM "$DPID"
    local i
    for i in $(seq 600); do
        kill -0 "$DPID" 2>/dev/null || break
        sleep 0.1
    done
    kill -0 "$DPID" 2>/dev/null && fail "ublkd did not stop within 60 s of SIGTERM"
    local rc=0
    wait "$DPID" || rc=$?
    DPID=
    [ "$rc" -eq 0 ] || fail "ublkd exited with $rc after SIGTERM"
}

# make_tree DIR SUMS : a tree of random files of assorted sizes; checksums into SUMS.
make_tree() {
    local dir=$1 sums=$2 i d
    for d in a a/b a/b/c d e; do mkdir -p "$dir/$d"; done
    for i in $(seq 1 24); do
        d=$(printf '%s\n' . a a/b a/b/c d e | sed -n "$((i % 6 + 1))p")
        head -c $(( (i * 7919) % 300000 + i )) /dev/urandom >"$dir/$d/f$i"
    done
    head -c $((8 << 20)) /dev/urandom >"$dir/big"
    : >"$dir/d/empty"
    (cd "$dir" && find . -type f -print0 | sort -z | xargs -0 sha256sum) >"$sums"
}

verify_tree() {
    local dir=$1 sums=$2 out
    out=$(cd "$dir" && sha256sum -c --quiet "$sums" 2>&1) || fail "checksums differ in $dir:
$out"
}

drop_caches() {
    sync
    echo 3 >/proc/sys/vm/drop_caches
}

# fsck_clean DEV : fsck.ext4 -fn must find nothing to fix
fsck_clean() {
    local out
    out=$(fsck.ext4 -fn "$1" 2>&1) || fail "fsck.ext4 -fn $1 found problems:
$out"
}

cleanup() {
    mountpoint -q "$W/mnt" 2>/dev/null && umount "$W/mnt" 2>/dev/null
    if [ -n "$DPID" ]; then
        kill -TERM "$DPID" 2>/dev/null || true
        wait "$DPID" 2>/dev/null || true
    fi
    return 0
}
trap cleanup EXIT

# watch_dev DEV : record in $W/missing any moment DEV is not a block device; stop it with
# unwatch_dev (which fails the test if DEV ever went missing).
watch_dev() {
    (
        while [ ! -e "$W/stop-watch" ]; do
            [ -b "$1" ] || echo "$1 missing at $(date +%s.%N)" >>"$W/missing"
            sleep 0.05
        done
    ) &
    WATCHER=$!
}

unwatch_dev() {
    touch "$W/stop-watch"
    wait "$WATCHER"
    [ ! -s "$W/missing" ] || fail "the device node disappeared: $(cat "$W/missing")"
}

# crash_and_recover DEV PID MIN_WRITES : once DEV has completed MIN_WRITES writes (while
# PID, the load, still runs), kill -9 the daemon, restart it with the same layout and
# check it re-attached to DEV.
crash_and_recover() {
    local dev=$1 load=$2 min=$3 writes=0
    for _ in $(seq 3000); do
        writes=$(awk '{print $5}' "/sys/block/${dev#/dev/}/stat")
        [ "$writes" -ge "$min" ] && break
        kill -0 "$load" 2>/dev/null || break
        sleep 0.02
    done
    kill -0 "$load" 2>/dev/null || fail "the load ended before the daemon could be killed"
    log "kill -9 ublkd after $writes writes"
    kill -9 "$DPID"
    wait "$DPID" 2>/dev/null || true
    DPID=
    sleep 1
    [ -b "$dev" ] || fail "$dev vanished when the daemon died"
    log "restarting ublkd"
    start_daemon
    [ "$(ublk_dev)" = "$dev" ] || fail "the restarted daemon did not re-attach to $dev"
    status_has '"recovered": *true' || fail "status does not say the device was recovered"
}

# no_io_errors DEV : the kernel logged no I/O error for DEV
no_io_errors() {
    local errs
    errs=$(dmesg | grep -iE "(${1#/dev/}|ext4).*(error|fail)|I/O error.*${1#/dev/}" || true)
    [ -z "$errs" ] || fail "the kernel logged errors for $1:
$errs"
}
