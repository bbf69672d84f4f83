#!/bin/bash
# What the kernel was told about the device, and the requests that carry no data: block
# sizes, write-back cache and FUA (so the kernel sends FLUSH and FUA), discard and
# write-zeroes limits; then zeroing and discarding ranges, and fsync/FUA writes that
# verify.
TEST=ops
. "$(dirname "$0")/lib.sh"

setup
layout ops raid1 "$(members 128M a b)" "export.ublk = { id = \"auto\", max_io = \"256KiB\" }"
start_daemon
dev=$(ublk_dev)
q=/sys/block/${dev#/dev/}/queue
expect() {
    local got
    got=$(cat "$q/$1")
    [ "$got" = "$2" ] || fail "$q/$1 is '$got', expected '$2'"
}
expect logical_block_size 512
expect physical_block_size 4096
expect write_cache "write back"
expect fua 1
expect max_hw_sectors_kb 256
[ "$(cat "$q/discard_max_hw_bytes")" -gt 0 ] || fail "no discard support advertised"
[ "$(cat "$q/write_zeroes_max_bytes")" -gt 0 ] || fail "no write-zeroes support advertised"
status_has '"max_io": *262144' || fail "status does not show max_io 256KiB"

# Write-zeroes over written data reads back as zeroes; discard succeeds.
must dd if=/dev/urandom of="$dev" bs=1M count=8 oflag=direct
must blkdiscard -z -o $((1 << 20)) -l $((5 << 20)) "$dev"
cmp -n $((5 << 20)) <(dd if="$dev" bs=1M skip=1 count=5 iflag=direct 2>/dev/null) /dev/zero ||
    fail "write-zeroes range does not read back as zeroes"
# An unaligned zeroing (sub-block edges go through read-modify-write in the array).
must blkdiscard -z -o $((7 << 20)) -l 4096 "$dev"
must blkdiscard -o $((16 << 20)) -l $((32 << 20)) "$dev"

# fsync after every write (FLUSH) and FUA writes, verified.
fio --name=flush --filename="$dev" --direct=1 --ioengine=io_uring --rw=randwrite --bs=4k \
    --size=4M --offset=64M --fsync=1 --verify=crc32c --verify_fatal=1 --verify_state_save=0 >"$W/fio-flush.out" 2>&1 ||
    fail "fio with fsync=1 failed: $(cat "$W/fio-flush.out")"
fio --name=fua --filename="$dev" --direct=1 --ioengine=sync --rw=write --bs=64k \
    --size=4M --offset=80M --sync=1 --verify=crc32c --verify_fatal=1 --verify_state_save=0 >"$W/fio-fua.out" 2>&1 ||
    fail "fio with O_SYNC (FUA) writes failed: $(cat "$W/fio-fua.out")"
no_io_errors "$dev"
stop_daemon
log "ok"
