#!/usr/bin/env bash
# volumed vs qemu-nbd, side by side in one run, through fio's nbd engine.
#
# Both servers serve a fully written file on the same filesystem; every job
# runs against each target in turn (alternating, so drift hits all alike):
#   volumed            release build, io_uring engine, page cache
#   qemu-nbd (none)    --cache=none --aio=io_uring (O_DIRECT)
#   qemu-nbd (default) its defaults (writeback cache, threads)
#   file (io_uring)    fio straight on a file, buffered: the local limit
# Prints IOPS, MiB/s, mean and p99 latency, and the volumed/qemu-nbd ratios.
#
# Usage: benches/nbd_vs_qemu.sh [runtime-seconds] [size-MiB]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNTIME=${1:-10}
SIZE_MIB=${2:-1024}
command -v qemu-nbd fio nbdcopy >/dev/null

cargo build --release --quiet --workspace --bins
BIN=target/release
NAME=bench
# shellcheck source=benches/common.sh
. benches/common.sh

start_volumed "$WORK/vd" "file://$WORK/store"
$VOL create bench --size "${SIZE_MIB}M" >/dev/null
VURI=$($VOL attach bench)

# The same random content everywhere, so reads hit allocated data.
head -c "${SIZE_MIB}M" /dev/urandom > "$WORK/src.img"
cp "$WORK/src.img" "$WORK/qemu-none.img"
cp "$WORK/src.img" "$WORK/qemu-default.img"
cp "$WORK/src.img" "$WORK/file.img"
nbdcopy "$WORK/src.img" "$VURI"
rm "$WORK/src.img"

QPORT1=$(free_port)
qemu-nbd -f raw -x bench -b 127.0.0.1 -p "$QPORT1" -t -e 16 --cache=none --aio=io_uring "$WORK/qemu-none.img" &
PIDS+=($!)
QPORT2=$(free_port)
qemu-nbd -f raw -x bench -b 127.0.0.1 -p "$QPORT2" -t -e 16 "$WORK/qemu-default.img" &
PIDS+=($!)
sleep 1

JOBS=(
  "randread-4k-qd1:randread:4k:1"
  "randread-4k-qd32:randread:4k:32"
  "randwrite-4k-qd1:randwrite:4k:1"
  "randwrite-4k-qd32:randwrite:4k:32"
  "read-1m-qd8:read:1m:8"
  "write-1m-qd8:write:1m:8"
)
TARGETS=(
  "volumed:--ioengine=nbd --uri=$VURI"
  "qemu-nbd(none):--ioengine=nbd --uri=nbd://127.0.0.1:$QPORT1/bench"
  "qemu-nbd(default):--ioengine=nbd --uri=nbd://127.0.0.1:$QPORT2/bench"
  "file(io_uring):--ioengine=io_uring --filename=$WORK/file.img"
)

RESULTS="$WORK/results.tsv"
: > "$RESULTS"
for job in "${JOBS[@]}"; do
    IFS=: read -r name rw bs qd <<<"$job"
    for target in "${TARGETS[@]}"; do
        tname=${target%%:*}
        targs=${target#*:}
        # shellcheck disable=SC2086
        fio --name="$name" $targs --rw="$rw" --bs="$bs" --iodepth="$qd" --size="${SIZE_MIB}M" \
            --time_based --runtime="$RUNTIME" --ramp_time=1 --output-format=json > "$WORK/out.json" 2>/dev/null
        /usr/bin/python3 - "$WORK/out.json" "$name" "$tname" >> "$RESULTS" <<'PY'
import json, sys
text = open(sys.argv[1]).read()  # the nbd engine prints a line before the JSON
j = json.loads(text[text.index("{"):])["jobs"][0]
side = j["read"] if j["read"]["io_bytes"] > 0 else j["write"]
lat = side["clat_ns"]
p99 = lat.get("percentile", {}).get("99.000000", 0)
print("\t".join([sys.argv[2], sys.argv[3], f"{side['iops']:.0f}", f"{side['bw'] / 1024:.1f}",
                 f"{lat['mean'] / 1000:.1f}", f"{p99 / 1000:.1f}"]))
PY
    done
done

/usr/bin/python3 - "$RESULTS" <<'PY'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
print(f"{'job':<18} {'target':<18} {'IOPS':>9} {'MiB/s':>9} {'mean us':>9} {'p99 us':>9}")
for r in rows:
    print(f"{r[0]:<18} {r[1]:<18} {r[2]:>9} {r[3]:>9} {r[4]:>9} {r[5]:>9}")
print()
print(f"{'job':<18} {'volumed/qemu-nbd(none)':>24} {'volumed/qemu-nbd(default)':>27}")
jobs = []
for r in rows:
    if r[0] not in jobs:
        jobs.append(r[0])
for job in jobs:
    by = {r[1]: float(r[2]) for r in rows if r[0] == job}
    v = by["volumed"]
    print(f"{job:<18} {v / by['qemu-nbd(none)']:>23.2f}x {v / by['qemu-nbd(default)']:>26.2f}x")
PY
