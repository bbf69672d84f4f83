#!/bin/bash
# kill -9 of ublkd in the middle of a fio verify write run on /dev/ublkbN; a new ublkd with
# the same layout re-attaches to the same device (user recovery); fio completes and its
# crc32c verification passes; the device node never disappears in between.
TEST=crash-recovery
. "$(dirname "$0")/lib.sh"

setup
layout r1 raid1 "$(members 256M a b)" "export.ublk = { id = \"auto\" }"
start_daemon
dev=$(ublk_dev)
watch_dev "$dev"
fio --name=crash --filename="$dev" --direct=1 --ioengine=io_uring \
    --rw=randwrite --bs=16k --iodepth=32 --numjobs=2 --size=48M --offset_increment=48M \
    --verify=crc32c --verify_fatal=1 --verify_state_save=0 --group_reporting >"$W/fio.out" 2>&1 &
fio_pid=$!
# Well before the write phase ends (6144 writes).
crash_and_recover "$dev" "$fio_pid" 1200
rc=0
wait "$fio_pid" || rc=$?
[ "$rc" -eq 0 ] || fail "fio failed across the restart (rc $rc): $(cat "$W/fio.out")"
grep -E 'WRITE:|READ:' "$W/fio.out" | sed "s/^/[$TEST]   /"
unwatch_dev
no_io_errors "$dev"
log "fio completed and verified across the restart; $dev stayed"
stop_daemon
[ ! -e "$dev" ] || fail "$dev still exists after a clean stop"
log "ok"
