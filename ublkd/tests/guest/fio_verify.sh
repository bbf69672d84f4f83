#!/bin/bash
# fio with O_DIRECT random writes and crc32c verification on the raw /dev/ublkbN of a raid10
# over four local files: two jobs, queue depth 32 each, disjoint halves of the device.
TEST=fio-verify
. "$(dirname "$0")/lib.sh"

setup
layout r10 raid10 "$(members 96M a b c d)" "export.ublk = { id = \"auto\" }"
start_daemon
dev=$(ublk_dev)
log "fio randwrite + verify=crc32c on $dev"
fio --name=verify --filename="$dev" --direct=1 --ioengine=io_uring \
    --rw=randwrite --bs=16k --iodepth=32 --numjobs=2 --size=40M --offset_increment=40M \
    --verify=crc32c --verify_fatal=1 --verify_state_save=0 --group_reporting >"$W/fio.out" 2>&1 ||
    fail "fio failed: $(cat "$W/fio.out")"
grep -E 'WRITE:|READ:' "$W/fio.out" | sed "s/^/[$TEST]   /"
stop_daemon
log "ok"
