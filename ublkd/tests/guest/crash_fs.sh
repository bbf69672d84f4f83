#!/bin/bash
# A mounted ext4 on /dev/ublkbN sees a pause, not an error, when ublkd is killed with -9
# and restarted: fio keeps writing (and verifying) a file in it across the restart, files
# written before the crash read back intact, the kernel logs no error, fsck is clean.
TEST=crash-fs
. "$(dirname "$0")/lib.sh"

setup
layout r1f raid1 "$(members 256M a b)" "export.ublk = { id = \"auto\" }"
start_daemon
dev=$(ublk_dev)
must mkfs.ext4 -q -F "$dev"
must mount "$dev" "$W/mnt"
make_tree "$W/mnt" "$W/sums"
sync
watch_dev "$dev"
fio --name=fs --directory="$W/mnt" --filename=load --size=64M --direct=1 --ioengine=io_uring \
    --rw=randwrite --bs=16k --iodepth=16 --verify=crc32c --verify_fatal=1 --verify_state_save=0 \
    >"$W/fio.out" 2>&1 &
fio_pid=$!
crash_and_recover "$dev" "$fio_pid" 1500
rc=0
wait "$fio_pid" || rc=$?
[ "$rc" -eq 0 ] || fail "fio in the file system failed across the restart (rc $rc): $(cat "$W/fio.out")"
unwatch_dev
rm "$W/mnt/load"
drop_caches
(cd "$W/mnt" && sha256sum -c --quiet "$W/sums") >"$W/verify.out" 2>&1 ||
    fail "files written before the crash differ: $(cat "$W/verify.out")"
must umount "$W/mnt"
fsck_clean "$dev"
no_io_errors "$dev"
log "the file system saw a pause, not an error"
stop_daemon
log "ok"
