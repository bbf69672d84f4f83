#!/bin/bash
# ext4 on /dev/ublkbN over a RAID array of two local files: mkfs, mount, write a tree with
# known checksums, sync, drop caches, verify, umount, fsck clean. A clean stop deletes the
# device; after a restart the data is still there.
# usage: fs.sh LEVEL DEV_ID
LEVEL=${1:?level}
ID=${2:?ublk id}
TEST=fs-$LEVEL
. "$(dirname "$0")/lib.sh"

setup
layout "$LEVEL" "$LEVEL" "$(members 256M a b)" \
    "chunk = \"64KiB\"" \
    "export.ublk = { id = $ID, queues = 2, depth = 64 }"
start_daemon
dev=$(ublk_dev)
[ "$dev" = "/dev/ublkb$ID" ] || fail "asked for id $ID, got $dev"
status_has '"queues": *2' || fail "status does not show 2 queues"
status_has '"depth": *64' || fail "status does not show depth 64"
log "array $LEVEL is $dev; mkfs.ext4"
must mkfs.ext4 -q -F "$dev"
must mount "$dev" "$W/mnt"
make_tree "$W/mnt" "$W/sums"
drop_caches
verify_tree "$W/mnt" "$W/sums"
log "tree verified after drop_caches"
must umount "$W/mnt"
fsck_clean "$dev"
stop_daemon
[ ! -e "$dev" ] || fail "$dev still exists after a clean stop"
log "clean stop deleted $dev; restarting"

start_daemon
dev=$(ublk_dev)
status_has '"recovered": *false' || fail "a clean restart must create a new device, not recover one"
must mount -o ro "$dev" "$W/mnt"
verify_tree "$W/mnt" "$W/sums"
must umount "$W/mnt"
fsck_clean "$dev"
stop_daemon
log "ok"
