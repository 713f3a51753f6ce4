#!/usr/bin/env bash
# Two (or more) volumed binaries and nbdkit's file plugin, alternating in
# one run through fio's nbd engine: for measuring a change to the data
# path against the code before it. Every target gets a fresh 1 GiB volume
# (or file), filled through its own server with FILL_BS writes, then sync.
# Each round runs every job against every target in turn and prints one
# line per target: IOPS, mean and p99 completion latency, server CPU per
# I/O, fio's own CPU per I/O, and context switches per I/O (all
# processes, from /proc/stat); for a job with FLUSHes, their mean latency.
#
# Usage: benches/nbd_ab.sh ROUNDS RUNTIME FILL_BS "rw:bs:qd[:fsync] ..." LABEL=BINARY... [LABEL=nbdkit]
#        (with fsync: a FLUSH every that many writes, 70/30 reads for randrw)
# e.g.   benches/nbd_ab.sh 2 5 4k "randread:4k:32 randwrite:4k:1" old=/tmp/volumed-old new=target/release/volumed kit=nbdkit
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 5 ] || { sed -n 2,13p "$0"; exit 2; }
ROUNDS=$1 RUNTIME=$2 FILL=$3 JOBS=$4
shift 4
command -v fio nbdkit >/dev/null

cargo build --release --quiet --workspace --bins
BIN=target/release
NAME=ab
# shellcheck source=benches/common.sh
. benches/common.sh

TARGETS=()
i=0
for spec in "$@"; do
    label=${spec%%=*} what=${spec#*=}
    if [ "$what" = nbdkit ]; then
        truncate -s 1024M "$WORK/k$i.img"
        port=$(free_port)
        nbdkit --foreground --exit-with-parent --ipaddr 127.0.0.1 --port "$port" file "$WORK/k$i.img" &
        PIDS+=($!)
        TARGETS+=("$label:$!:nbd://127.0.0.1:$port/")
    else
        dir="$WORK/vd$i" port=$(free_port)
        mkdir -p "$dir"
        VOLUMED_STORE="file://$WORK/store$i" "$what" --data-dir "$dir" --nbd-listen "127.0.0.1:$port" 2>>"$dir.log" &
        VPID=$!
        PIDS+=($VPID)
        for _ in $(seq 100); do [ -S "$dir/volumed.sock" ] && break; sleep 0.1; done
        VOL="$BIN/vol --socket $dir/volumed.sock"
        $VOL create bench --size 1024M >/dev/null
        TARGETS+=("$label:$VPID:$($VOL attach bench)")
    fi
    i=$((i + 1))
done
sleep 0.5
# Not the first file written: see warm_fill (common.sh).
warm_fill 1024
for t in "${TARGETS[@]}"; do
    fio --name=fill --ioengine=nbd --uri="${t#*:*:}" --rw=write --bs="$FILL" --iodepth=8 \
        --size=1024M --refill_buffers --output-format=terse >/dev/null 2>&1
done
sync

switches() { awk '/^ctxt/ {print $2}' /proc/stat; }
for r in $(seq "$ROUNDS"); do
    for job in $JOBS; do
        IFS=: read -r rw bs qd fsync <<<"$job"
        extra=()
        [ -n "${fsync:-}" ] && extra=(--fsync="$fsync" --rwmixread=70)
        for t in "${TARGETS[@]}"; do
            tname=${t%%:*} rest=${t#*:}
            pid=${rest%%:*} uri=${rest#*:}
            c0=$(cpu_us "$pid") s0=$(switches)
            fio --name=j --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bs" --iodepth="$qd" "${extra[@]}" --size=1024M \
                --time_based --runtime="$RUNTIME" --output-format=json > "$WORK/out.json" 2>/dev/null
            c1=$(cpu_us "$pid") s1=$(switches)
            /usr/bin/python3 - "$WORK/out.json" "$r" "$job" "$tname" $((c1 - c0)) $((s1 - s0)) <<'PY'
import json, sys
text = open(sys.argv[1]).read()  # the nbd engine prints a line before the JSON
j = json.loads(text[text.index("{"):])["jobs"][0]
# A mixed job: both sides' IOPS and I/Os, the writes' latency.
sides = [j[d] for d in ("read", "write") if j[d]["io_bytes"] > 0]
side = dict(sides[-1], iops=sum(s["iops"] for s in sides), total_ios=sum(s["total_ios"] for s in sides))
lat, n = side["clat_ns"], side["total_ios"] or 1
p99 = lat.get("percentile", {}).get("99.000000", 0)
# fio's own CPU per I/O (usr/sys are percent of one CPU over the run).
client = (j["usr_cpu"] + j["sys_cpu"]) / 100 * j["job_runtime"] * 1000 / n
# With a FLUSH job, the FLUSHes' own mean latency too.
sync = j.get("sync", {})
flush = f" flush {sync['lat_ns']['mean'] / 1000:>7.1f}" if sync.get("total_ios") else ""
print(f"round {sys.argv[2]} {sys.argv[3]:<16} {sys.argv[4]:<10} IOPS {side['iops']:>8.0f} mean {lat['mean'] / 1000:>7.1f} "
      f"p99 {p99 / 1000:>7.1f} cpu/io {int(sys.argv[5]) / n:>6.1f} fio/io {client:>6.1f} cs/io {int(sys.argv[6]) / n:>5.2f}{flush}")
PY
        done
    done
done
