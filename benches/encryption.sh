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
# and the ratio encrypted / unencrypted of each rate.
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

/usr/bin/python3 - "$WORK/src.img" "$SIZE_MIB" <<'PY'
import os, sys
path, mib = sys.argv[1], int(sys.argv[2])
text = (b"volumed block storage " * 24000)[: 512 << 10]
with open(path, "wb") as f:
    for i in range(mib * 2):   # 512 KiB pieces: random, text, random, ...
        f.write(os.urandom(512 << 10) if i % 2 == 0 else text)
PY

cpu_secs() { # pid -> user+system CPU seconds so far
    awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15) / hz}' "/proc/$1/stat"
}

declare -A RATE
printf '%-6s %-10s %-10s %8s %9s %8s\n' store mode step seconds MiB/s cpu_s
for STORE in local s3; do
    for MODE in plain encrypted; do
        case $STORE in
            local) URL="file://$WORK/store-$MODE" ;;
            s3) URL="s3://volumed/$MODE" ;;
        esac
        FLAGS=(--store-encryption off)
        [ "$MODE" = encrypted ] && FLAGS=(--store-encryption on)
        DIR="$WORK/vd-$STORE-$MODE"
        start_volumed "$DIR" "$URL" "${FLAGS[@]}"
        $VOL create src --size "${SIZE_MIB}M" >/dev/null
        URI=$($VOL attach src)
        nbdcopy "$WORK/src.img" "$URI"
        step() { # name seconds cpu
            local mib
            mib=$(/usr/bin/python3 -c "print(f'{$SIZE_MIB / $2:.1f}')")
            RATE["$STORE-$MODE-$1"]=$mib
            printf '%-6s %-10s %-10s %8.2f %9s %8.1f\n' "$STORE" "$MODE" "$1" "$2" "$mib" "$3"
        }
        C0=$(cpu_secs "$VPID"); T0=$(now)
        ID=$($VOL --json snapshot create src --wait | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
        T1=$(now); C1=$(cpu_secs "$VPID")
        step full "$(echo "$T1 - $T0" | bc -l)" "$(echo "$C1 - $C0" | bc -l)"
        kill "$VPID"; wait "$VPID" 2>/dev/null || true
        start_volumed "$DIR" "$URL" "${FLAGS[@]}" --cache-size 0
        C0=$(cpu_secs "$VPID"); T0=$(now)
        $VOL create hyd --from-snapshot "$ID" --wait >/dev/null
        T1=$(now); C1=$(cpu_secs "$VPID")
        step hydration "$(echo "$T1 - $T0" | bc -l)" "$(echo "$C1 - $C0" | bc -l)"
        kill "$VPID"; wait "$VPID" 2>/dev/null || true
    done
    for S in full hydration; do
        /usr/bin/python3 -c "print(f'$STORE $S encrypted/plain: {${RATE[$STORE-encrypted-$S]} / ${RATE[$STORE-plain-$S]}:.2f}')"
    done
done
