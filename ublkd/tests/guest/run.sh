#!/bin/bash
# Runs every guest test (inside the VM), each in its own process, and prints a summary.
# Exit status: 0 when all pass, 1 otherwise. `cargo xtask vm-test` boots the VM and runs
# this; to run one test: cargo xtask vm-test -- crash_recovery
set -uo pipefail
cd "$(dirname "$0")"
# Tools from util-linux and friends expect these; the guest's devtmpfs lacks them.
[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd

ALL="ops.sh fs.sh:raid1:0 fs.sh:raid0:1 fio_verify.sh crash_recovery.sh crash_fs.sh nbd_client.sh"
want=${*:-}
results=()
failed=0
for t in $ALL; do
    IFS=: read -r script a1 a2 <<<"$t"
    label=${script%.sh}${a1:+-$a1}
    if [ -n "$want" ] && ! grep -qw -- "${script%.sh}" <<<"$want" && ! grep -qw -- "$label" <<<"$want"; then
        continue
    fi
    echo "=== $label"
    start=$(date +%s%N)
    if bash "./$script" ${a1:+"$a1"} ${a2:+"$a2"}; then res=ok; else res=FAIL; failed=1; fi
    ms=$((($(date +%s%N) - start) / 1000000))
    results+=("$(printf '%-4s %-24s %4d.%ds' "$res" "$label" $((ms / 1000)) $((ms % 1000 / 100)))")
done
echo "=== guest summary (kernel $(uname -r))"
printf '  %s\n' "${results[@]}"
n_ok=$(printf '%s\n' "${results[@]}" | grep -c '^ok ')
n_fail=$(printf '%s\n' "${results[@]}" | grep -c '^FAIL')
echo "guest: $n_ok passed, $n_fail failed"
[ ${#results[@]} -gt 0 ] || { echo "no test matched: $want"; exit 1; }
exit $failed
