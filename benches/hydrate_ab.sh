#!/usr/bin/env bash
# Two volumed binaries restoring the same snapshot, for measuring a change
# to the hydration path against the code before it. One snapshot of
# SIZE_MIB (half random, half text) is taken into a local store; then each
# round hydrates it once per binary in the order A B B A, each into a fresh
# data dir, with the chunk cache off, after SIZE_MIB of other dirty data
# (a host's page cache is rarely clean, and dirty-page throttling is where
# the writers' inode lock contention shows). Prints the job's own seconds
# (its `elapsed_ms`), MiB/s and volumed's CPU seconds per hydration.
#
# Usage: benches/hydrate_ab.sh SIZE_MIB ROUNDS BINARY_A BINARY_B
#        (both binaries must log `elapsed_ms` when a hydration ends: main dd57740 on)
# e.g.   benches/hydrate_ab.sh 4096 2 /tmp/volumed-before target/release/volumed
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 4 ] || { sed -n 2,14p "$0"; exit 2; }
SIZE_MIB=$1 ROUNDS=$2 A=$3 B=$4
command -v nbdcopy >/dev/null
cargo build --release --quiet --workspace --bins
BIN=target/release
NAME=hydrate-ab
# shellcheck source=benches/common.sh
. benches/common.sh

make_mixed_image "$WORK/src.img" "$SIZE_MIB"

VOLUMED_BIN=$A start_volumed "$WORK/src" "file://$WORK/store"
$VOL create src --size "${SIZE_MIB}M" >/dev/null
nbdcopy "$WORK/src.img" "$($VOL attach src)"
ID=$($VOL --json snapshot create src --wait | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
kill "$VPID"; wait "$VPID" 2>/dev/null || true
rm -rf "$WORK/src" "$WORK/src.img"

printf '%-6s %-28s %8s %8s %8s\n' round binary seconds MiB/s cpu_s
n=0
for r in $(seq "$ROUNDS"); do
    for X in "$A" "$B" "$B" "$A"; do
        n=$((n + 1)) DIR="$WORK/h$n"
        dd if=/dev/zero of="$WORK/dirty" bs=1M count="$SIZE_MIB" status=none
        VOLUMED_BIN=$X start_volumed "$DIR" "file://$WORK/store" --cache-size 0
        C0=$(cpu_secs "$VPID")
        $VOL create hyd --from-snapshot "$ID" --wait >/dev/null
        C1=$(cpu_secs "$VPID")
        secs=$(job_seconds "$DIR.log" "hydration complete")
        awk -v r="$r" -v x="$X" -v s="$secs" -v mib="$SIZE_MIB" -v c="$(echo "$C1 - $C0" | bc -l)" \
            'BEGIN { printf "%-6s %-28s %8.2f %8.0f %8.2f\n", r, x, s, mib / s, c }'
        kill "$VPID"; wait "$VPID" 2>/dev/null || true
        rm -rf "$DIR" "$WORK/dirty"
        sync
    done
done
