#!/usr/bin/env bash
# What encryption costs end to end, against the local store and SeaweedFS
# (S3), unencrypted and encrypted side by side (the issue's target: the
# encrypted rates at least 0.9 of the unencrypted ones on two cores).
#
# For each store and mode: a fresh store, a volume of SIZE_MIB (half random,
# half text, so zstd has work and the raw path is taken too), then
#   full snapshot   the first snapshot, every chunk hashed, compressed,
#                   (sealed,) uploaded: seconds, MiB/s, volumed CPU seconds
#   hydration       `vol create --from-snapshot --wait`, chunk cache off:
#                   seconds, MiB/s, volumed CPU seconds
# and the ratio encrypted / unencrypted of each rate. The modes run in the
# order plain, encrypted, encrypted, plain for each store (each mode's rate
# over its two runs' total time gives the ratio): with one fixed order, whichever went
# second met a store SeaweedFS had already grown and a page cache already
# full, and the ratio measured the order. Against S3 the store's own CPU
# (SeaweedFS on the same two cores) is printed too. A step's seconds are
# the job's own, from the `elapsed_ms` of its last log line: `--wait` polls
# every 250 ms, which on a 1 GiB step of under a second was a quarter of it.
#
# Usage: benches/encryption.sh [size-MiB]   (default 4096)
# VOLUMED_BENCH_BIN=target/debug runs existing binaries without building
# release ones (a dry run of the script, not a measurement).
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${1:-4096}
if [ -n "${VOLUMED_BENCH_BIN:-}" ]; then
    BIN=$VOLUMED_BENCH_BIN
else
    cargo build --release --quiet --workspace --bins
    BIN=target/release
fi
command -v nbdcopy >/dev/null
NAME=encbench
# shellcheck source=benches/common.sh
. benches/common.sh
start_weed

make_mixed_image "$WORK/src.img" "$SIZE_MIB"

weed_cpu() { # SeaweedFS's CPU seconds so far, 0 for the local store
    if [ "$STORE" = s3 ]; then cpu_secs "$WEED_PID"; else echo 0; fi
}

declare -A RATE
printf '%-6s %-10s %-10s %8s %9s %8s %8s\n' store mode step seconds MiB/s cpu_s weed_s
for STORE in local s3; do
    RUN=0
    MODES=(plain encrypted encrypted plain)
    # A first run, not counted: the first large copy of a series on this
    # VM is the slow one whoever makes it (4 GiB: 6.0 s for the first plain
    # snapshot in three series out of three, 4.5-5.1 for the other plain one).
    [ "$STORE" = local ] && MODES=(warmup "${MODES[@]}")
    for MODE in "${MODES[@]}"; do
        RUN=$((RUN + 1))
        case $STORE in
            local) URL="file://$WORK/store-$MODE-$RUN" ;;
            s3) URL="s3://volumed/$MODE-$RUN" ;;
        esac
        FLAGS=(--store-encryption off)
        [ "$MODE" = encrypted ] && FLAGS=(--store-encryption on)
        DIR="$WORK/vd-$STORE-$MODE-$RUN"
        if [ "$MODE" = warmup ]; then
            start_volumed "$DIR" "$URL" "${FLAGS[@]}"
            $VOL create src --size "${SIZE_MIB}M" >/dev/null
            nbdcopy "$WORK/src.img" "$($VOL attach src)"
            $VOL snapshot create src --wait >/dev/null
            kill "$VPID"; wait "$VPID" 2>/dev/null || true
            rm -rf "$DIR" "$WORK/store-$MODE-$RUN"
            continue
        fi
        start_volumed "$DIR" "$URL" "${FLAGS[@]}"
        $VOL create src --size "${SIZE_MIB}M" >/dev/null
        URI=$($VOL attach src)
        nbdcopy "$WORK/src.img" "$URI"
        step() { # name seconds cpu weed-cpu
            local mib
            mib=$(/usr/bin/python3 -c "print(f'{$SIZE_MIB / $2:.1f}')")
            RATE["$STORE-$MODE-$1"]="${RATE["$STORE-$MODE-$1"]:-} $mib"
            printf '%-6s %-10s %-10s %8.2f %9s %8.1f %8.1f\n' "$STORE" "$MODE" "$1" "$2" "$mib" "$3" "$4"
        }
        C0=$(cpu_secs "$VPID"); W0=$(weed_cpu)
        ID=$($VOL --json snapshot create src --wait | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
        C1=$(cpu_secs "$VPID"); W1=$(weed_cpu)
        step full "$(job_seconds "$DIR.log" "snapshot completed")" "$(echo "$C1 - $C0" | bc -l)" "$(echo "$W1 - $W0" | bc -l)"
        kill "$VPID"; wait "$VPID" 2>/dev/null || true
        start_volumed "$DIR" "$URL" "${FLAGS[@]}" --cache-size 0
        C0=$(cpu_secs "$VPID"); W0=$(weed_cpu)
        $VOL create hyd --from-snapshot "$ID" --wait >/dev/null
        C1=$(cpu_secs "$VPID"); W1=$(weed_cpu)
        step hydration "$(job_seconds "$DIR.log" "hydration complete")" "$(echo "$C1 - $C0" | bc -l)" "$(echo "$W1 - $W0" | bc -l)"
        kill "$VPID"; wait "$VPID" 2>/dev/null || true
        # Four runs per store would otherwise hold 12 GiB by the end.
        rm -rf "$DIR" "$WORK/store-$MODE-$RUN"
    done
    for S in full hydration; do
        /usr/bin/python3 - "$STORE $S" "${RATE[$STORE-encrypted-$S]}" "${RATE[$STORE-plain-$S]}" <<'PY'
import sys
name, enc, plain = sys.argv[1], [float(x) for x in sys.argv[2].split()], [float(x) for x in sys.argv[3].split()]
# Rates over the runs' total time (the harmonic mean): in A B B A order
# that cancels a drift that is linear in seconds, as the page cache fills.
mean = lambda v: len(v) / sum(1 / x for x in v)
print(f"{name} encrypted/plain: {mean(enc) / mean(plain):.2f} (over {len(enc)} runs each;"
      f" single runs {min(enc) / max(plain):.2f} to {max(enc) / min(plain):.2f})")
PY
    done
done
