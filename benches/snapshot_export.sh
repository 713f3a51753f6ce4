#!/usr/bin/env bash
# Reading a snapshot through its read-only NBD export vs through a volume
# restored from it, on the local store and SeaweedFS (S3), in one run.
#
# For each store, a volume of SIZE_MIB random data is snapshotted; then, in
# ROUNDS alternating rounds, the whole snapshot is read with
# `nbdcopy -C 4 URI null:` from:
#   export (cold)     `vol snapshot attach`, chunk cache off: every chunk
#                     comes from the store
#   restore (cold)    `vol create --from-snapshot --no-hydrate` + attach, cache
#                     off: every chunk comes from the store and is written
#                     into the volume on the way
#   restore (local)   the same volume read again: all chunks local now
# and with the chunk cache on (default 4 GiB):
#   export (cached)   the export read a second time: every chunk from the
#                     host cache
# Prints MiB/s per round, the median, and export/restore ratios.
#
# Usage: benches/snapshot_export.sh [size-MiB] [rounds]   (default 1024 3)
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${1:-1024}
ROUNDS=${2:-3}
cargo build --release --quiet --workspace --bins
BIN=target/release
command -v nbdcopy >/dev/null
NAME=exportbench
# shellcheck source=benches/common.sh
. benches/common.sh
start_weed
head -c "${SIZE_MIB}M" /dev/urandom > "$WORK/src.img"

rate() { # uri -> MiB/s of a full read
    local t0 t1
    t0=$(now)
    nbdcopy -C 4 "$1" null:
    t1=$(now)
    echo "$SIZE_MIB $t0 $t1" | awk '{printf "%.0f", $1 / ($3 - $2)}'
}
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

for STORE in local s3; do
    case $STORE in
        local) URL="file://$WORK/store" ;;
        s3) URL="s3://volumed/export" ;;
    esac
    start_volumed "$WORK/vd-$STORE" "$URL" --cache-size 0
    $VOL create src --size "${SIZE_MIB}M" >/dev/null
    SRC=$($VOL attach src)
    nbdcopy "$WORK/src.img" "$SRC"
    ID=$($VOL --json snapshot create src --wait | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
    $VOL detach src >/dev/null

    EXP=(); RES=(); LOC=()
    for i in $(seq "$ROUNDS"); do
        URI=$($VOL snapshot attach "$ID")
        EXP+=("$(rate "$URI")")
        $VOL snapshot detach "$ID" >/dev/null
        $VOL create "r$i" --from-snapshot "$ID" --no-hydrate >/dev/null
        URI=$($VOL attach "r$i")
        RES+=("$(rate "$URI")")
        LOC+=("$(rate "$URI")")
        $VOL detach "r$i" >/dev/null
        $VOL delete "r$i" >/dev/null
    done
    kill "$VPID"; wait "$VPID" 2>/dev/null || true

    start_volumed "$WORK/vd-$STORE" "$URL"
    URI=$($VOL snapshot attach "$ID")
    rate "$URI" >/dev/null   # fills the cache
    CACHED=()
    for i in $(seq "$ROUNDS"); do CACHED+=("$(rate "$URI")"); done
    $VOL snapshot detach "$ID" >/dev/null
    kill "$VPID"; wait "$VPID" 2>/dev/null || true

    echo "$STORE, ${SIZE_MIB} MiB, MiB/s per round:"
    echo "  export (cold)    ${EXP[*]}   median $(median "${EXP[@]}")"
    echo "  restore (cold)   ${RES[*]}   median $(median "${RES[@]}")"
    echo "  restore (local)  ${LOC[*]}   median $(median "${LOC[@]}")"
    echo "  export (cached)  ${CACHED[*]}   median $(median "${CACHED[@]}")"
    awk -v e="$(median "${EXP[@]}")" -v r="$(median "${RES[@]}")" -v l="$(median "${LOC[@]}")" -v c="$(median "${CACHED[@]}")" \
        'BEGIN {printf "  export/restore cold %.2fx, export cached/restore local %.2fx\n", e / r, c / l}'
done
