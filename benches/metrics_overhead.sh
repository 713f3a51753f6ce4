#!/usr/bin/env bash
# What measuring costs: 4k random writes and reads at QD32 (fio's nbd
# engine) against volumed with `--metrics-listen` and without, alternating
# in one run, each round on a fresh daemon over the same volume files, with
# the metrics endpoint scraped every second while metrics are on (as a
# Prometheus server would). Prints IOPS per round and on/off ratios.
#
# Usage: benches/metrics_overhead.sh [runtime-seconds] [rounds] [size-MiB]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNTIME=${1:-10}
ROUNDS=${2:-3}
SIZE_MIB=${3:-1024}
command -v fio curl >/dev/null
cargo build --release --quiet --workspace --bins
BIN=target/release
NAME=metricsbench
# shellcheck source=benches/common.sh
. benches/common.sh

# One volume, written once in 4 KiB pieces (the page-cache state random
# writes are fastest in), then served by each daemon in turn.
start_volumed "$WORK/vd" "file://$WORK/store"
$VOL create bench --size "${SIZE_MIB}M" >/dev/null
URI=$($VOL attach bench)
fio --name=fill --ioengine=nbd --uri="$URI" --rw=write --bs=4k --iodepth=32 --size="${SIZE_MIB}M" >/dev/null 2>&1
kill "$VPID"; wait "$VPID" 2>/dev/null || true

iops() { # rw -> IOPS
    fio --name=m --ioengine=nbd --uri="$URI" --rw="$1" --bs=4k --iodepth=32 --size="${SIZE_MIB}M" \
        --time_based --runtime="$RUNTIME" --output-format=json 2>/dev/null >"$WORK/fio.json"
    /usr/bin/python3 - "$WORK/fio.json" "$1" <<'PY'
import json, sys
t = open(sys.argv[1]).read()
j = json.loads(t[t.index("{"):])["jobs"][0]
print(f'{j["write" if "write" in sys.argv[2] else "read"]["iops"]:.0f}')
PY
}

declare -A R
for i in $(seq "$ROUNDS"); do
    for mode in off on; do
        if [ $mode = on ]; then
            MPORT=$(free_port)
            start_volumed "$WORK/vd" "file://$WORK/store" --metrics-listen "127.0.0.1:$MPORT"
            ( while sleep 1; do curl -sf "http://127.0.0.1:$MPORT/metrics" >/dev/null || true; done ) &
            SCRAPER=$!; PIDS+=($SCRAPER)
        else
            start_volumed "$WORK/vd" "file://$WORK/store"
        fi
        URI=$($VOL attach bench)   # attached already: the URI on this start's port
        for rw in randwrite randread; do
            R[$mode-$rw]+="$(iops $rw) "
        done
        [ $mode = on ] && kill "$SCRAPER" 2>/dev/null
        kill "$VPID"; wait "$VPID" 2>/dev/null || true
    done
done

median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
for rw in randwrite randread; do
    # shellcheck disable=SC2086
    off=$(median ${R[off-$rw]}); on=$(median ${R[on-$rw]})
    echo "$rw 4k QD32 IOPS  off: ${R[off-$rw]}(median $off)  on: ${R[on-$rw]}(median $on)"
    awk -v a="$on" -v b="$off" -v rw="$rw" 'BEGIN {printf "  %s with metrics / without: %.3f\n", rw, a / b}'
done
