#!/usr/bin/env bash
# volumed's CPU seconds (user+system, and user alone, from /proc/PID/stat)
# for a full snapshot and a hydration (chunk cache off) of one volume on the
# local store, unencrypted and `--store-encryption on` alternating, REPS
# times: CPU, not wall time, so a busy machine blurs it less. With `perf`
# as third argument each step is also recorded with `perf record -g` into
# the scratch dir, kept (its path printed).
#
# Usage: benches/encryption_cpu.sh [size-MiB] [reps] [perf]   (1024 3)
# The volume: half random 512 KiB pieces, half text (as encryption.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${1:-1024}
REPS=${2:-3}
PERF=${3:-}
if [ -n "${VOLUMED_BENCH_BIN:-}" ]; then
    BIN=$VOLUMED_BENCH_BIN
else
    cargo build --release --quiet --workspace --bins
    BIN=target/release
fi
NAME=enccpu
# shellcheck source=benches/common.sh
. benches/common.sh
[ -n "$PERF" ] && { trap - EXIT; echo "perf data in $WORK"; }

make_mixed_image "$WORK/src.img" "$SIZE_MIB"

cpu() { # pid -> "user+system user" CPU seconds so far
    awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15) / hz, $14 / hz}' "/proc/$1/stat"
}
record() { # step: starts perf on VPID if asked
    PP=
    if [ -n "$PERF" ]; then
        perf record -F 999 -g -o "$WORK/perf-$MODE-$1-$r.data" -p "$VPID" 2>/dev/null &
        PP=$!
        sleep 0.5
    fi
}
unrecord() { if [ -n "$PP" ]; then kill -INT "$PP"; wait "$PP" || true; fi; }

printf '%-10s %4s %-10s %8s %8s\n' mode rep step cpu_s user_s
for r in $(seq "$REPS"); do
    for MODE in plain encrypted; do
        DIR="$WORK/vd-$MODE-$r"
        FLAGS=(--store-encryption off)
        [ "$MODE" = encrypted ] && FLAGS=(--store-encryption on)
        start_volumed "$DIR" "file://$WORK/store-$MODE-$r" "${FLAGS[@]}"
        $VOL create src --size "${SIZE_MIB}M" >/dev/null
        nbdcopy "$WORK/src.img" "$($VOL attach src)"
        sync
        record full
        read -r C0 U0 < <(cpu "$VPID")
        ID=$($VOL --json snapshot create src --wait | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
        read -r C1 U1 < <(cpu "$VPID")
        unrecord
        kill "$VPID"; wait "$VPID" 2>/dev/null || true
        start_volumed "$DIR" "file://$WORK/store-$MODE-$r" "${FLAGS[@]}" --cache-size 0
        record hydration
        read -r C2 U2 < <(cpu "$VPID")
        $VOL create hyd --from-snapshot "$ID" --wait >/dev/null
        read -r C3 U3 < <(cpu "$VPID")
        unrecord
        kill "$VPID"; wait "$VPID" 2>/dev/null || true
        printf '%-10s %4s %-10s %8.2f %8.2f\n' "$MODE" "$r" full "$(echo "$C1 - $C0" | bc -l)" "$(echo "$U1 - $U0" | bc -l)"
        printf '%-10s %4s %-10s %8.2f %8.2f\n' "$MODE" "$r" hydration "$(echo "$C3 - $C2" | bc -l)" "$(echo "$U3 - $U2" | bc -l)"
        [ -n "$PERF" ] || rm -rf "$DIR" "$WORK/store-$MODE-$r"
    done
done
