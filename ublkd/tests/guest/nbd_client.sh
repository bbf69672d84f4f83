#!/bin/bash
# The kernel's NBD client on our NBD export: mkfs, mount, write a tree, drop caches,
# verify, umount, fsck clean; then the same array through the other frontend: mount its
# /dev/ublkbN read-only and verify the same tree.
TEST=nbd-client
. "$(dirname "$0")/lib.sh"

PORT=10809
NBD=/dev/nbd0
setup
modprobe nbd || fail "modprobe nbd"
layout r1n raid1 "$(members 256M a b)" \
    "export.nbd = { listen = [\"127.0.0.1:$PORT\"] }" \
    "export.ublk = { id = \"auto\" }"
start_daemon
dev=$(ublk_dev)
must nbd-client 127.0.0.1 "$PORT" "$NBD" -N r1n -b 4096
nbd_cleanup() {
    mountpoint -q "$W/mnt" 2>/dev/null && umount "$W/mnt"
    nbd-client -d "$NBD" >/dev/null 2>&1 || true
    cleanup
}
trap nbd_cleanup EXIT
log "nbd-client attached $NBD; mkfs.ext4"
must mkfs.ext4 -q -F "$NBD"
must mount "$NBD" "$W/mnt"
make_tree "$W/mnt" "$W/sums"
drop_caches
verify_tree "$W/mnt" "$W/sums"
must umount "$W/mnt"
fsck_clean "$NBD"
must nbd-client -d "$NBD"
log "verified through NBD; now through $dev"
# The ublk device may hold blocks cached before NBD wrote them.
must blockdev --flushbufs "$dev"
drop_caches
must mount -o ro "$dev" "$W/mnt"
verify_tree "$W/mnt" "$W/sums"
must umount "$W/mnt"
fsck_clean "$dev"
stop_daemon
log "ok"
