#!/usr/bin/env bash
# volumed against its three peers, side by side in one run, through fio's
# nbd engine, each pair from the same history:
#   volumed            release build, io_uring engine, page cache
#   nbdkit(file)       nbdkit's file plugin on a raw file (thread pool, pread/pwrite)
#   qemu-nbd(default)  qemu-nbd's defaults (writeback cache, thread pool)
#   qemu-nbd(none)     --cache=none --aio=io_uring (O_DIRECT)
#
# History (the page-cache state the jobs meet, which decides 4k write
# speed on this kernel more than any server does): every target starts
# empty (a fresh volume; fresh sparse files for the peers), is filled with
# SIZE_MIB of random data through its own server with writes of FILL_BS
# (1m: large page-cache folios; 4k: small ones), then `sync`.
#
# Every job runs against each target in turn. Printed: IOPS, MiB/s, mean and
# p99 completion latency, server CPU per I/O (user+system µs of the server
# process over the job / I/Os done), then volumed/peer IOPS ratios and the
# ratio to the best peer.
#
# Then bulk: SIZE_MIB of random data copied in with nbdcopy (4 connections,
# --flush) into fresh targets (a new volume; the peers' files cut to empty
# and grown back, so sparse again), and read back to null: the same way;
# twice, the second pass in reverse order.
#
# Jobs: 4k random reads and writes at QD1 and QD32, 1M reads and writes at
# QD8, and three with FLUSH: randrw 70/30 4k QD16 flushing every 32 writes,
# randwrite 4k QD1 flushing after each, 1M writes at QD8 flushing every 64.
#
# Usage: benches/nbd_peers.sh [runtime-seconds] [size-MiB] [fill-bs]
#        (defaults 6 2048 1m); on XFS: benches/xfs.sh 8 benches/nbd_peers.sh ...
set -euo pipefail
cd "$(dirname "$0")/.."
RUNTIME=${1:-6}
SIZE_MIB=${2:-2048}
FILL_BS=${3:-1m}
command -v qemu-nbd nbdkit fio nbdcopy >/dev/null

cargo build --release --quiet --workspace --bins
BIN=target/release
NAME=peers
# shellcheck source=benches/common.sh
. benches/common.sh

start_volumed "$WORK/vd" "file://$WORK/store"
$VOL create bench --size "${SIZE_MIB}M" >/dev/null
VURI=$($VOL attach bench)
for f in nbdkit qemu-default qemu-none; do truncate -s "${SIZE_MIB}M" "$WORK/$f.img"; done

KPORT=$(free_port)
nbdkit --foreground --exit-with-parent --ipaddr 127.0.0.1 --port "$KPORT" file "$WORK/nbdkit.img" &
KPID=$!; PIDS+=($KPID)
QPORT1=$(free_port)
qemu-nbd -f raw -x bench -b 127.0.0.1 -p "$QPORT1" -t -e 16 "$WORK/qemu-default.img" &
QPID1=$!; PIDS+=($QPID1)
QPORT2=$(free_port)
qemu-nbd -f raw -x bench -b 127.0.0.1 -p "$QPORT2" -t -e 16 --cache=none --aio=io_uring "$WORK/qemu-none.img" &
QPID2=$!; PIDS+=($QPID2)
sleep 1

TARGETS=(
  "volumed:$VPID:$VURI"
  "nbdkit(file):$KPID:nbd://127.0.0.1:$KPORT/"
  "qemu-nbd(default):$QPID1:nbd://127.0.0.1:$QPORT1/bench"
  "qemu-nbd(none):$QPID2:nbd://127.0.0.1:$QPORT2/bench"
)

# The same history everywhere: random data in FILL_BS writes, then sync;
# none of them the first file written (warm_fill, common.sh).
warm_fill "$SIZE_MIB"
for t in "${TARGETS[@]}"; do
    uri=${t#*:*:}
    fio --name=fill --ioengine=nbd --uri="$uri" --rw=write --bs="$FILL_BS" --iodepth=8 \
        --size="${SIZE_MIB}M" --refill_buffers --output-format=terse >/dev/null 2>&1
done
sync

JOBS=(
  "randread-4k-qd1:randread:4k:1"
  "randread-4k-qd32:randread:4k:32"
  "randwrite-4k-qd1:randwrite:4k:1"
  "randwrite-4k-qd32:randwrite:4k:32"
  "read-1m-qd8:read:1m:8"
  "write-1m-qd8:write:1m:8"
  # What a database guest does: 70/30 reads and writes with a FLUSH every
  # 32 writes, and a FLUSH after every write at QD1 (fio's nbd engine sends
  # NBD_CMD_FLUSH for both fsync and fdatasync; it takes only fsync).
  "randrw-4k-qd16-fsync32:randrw:4k:16:32"
  "randwrite-4k-qd1-fsync1:randwrite:4k:1:1"
  # A guest streaming a large file: 1M writes with a FLUSH every 64 MiB.
  "write-1m-qd8-fsync64:write:1m:8:64"
)
RESULTS="$WORK/results.tsv"
: > "$RESULTS"
for job in "${JOBS[@]}"; do
    IFS=: read -r name rw bs qd fsync <<<"$job"
    extra=()
    [ -n "${fsync:-}" ] && extra=(--fsync="$fsync" --rwmixread=70)
    for t in "${TARGETS[@]}"; do
        tname=${t%%:*}; rest=${t#*:}; pid=${rest%%:*}; uri=${rest#*:}
        c0=$(cpu_us "$pid")
        fio --name="$name" --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bs" --iodepth="$qd" "${extra[@]}" \
            --size="${SIZE_MIB}M" --time_based --runtime="$RUNTIME" --output-format=json > "$WORK/out.json" 2>/dev/null
        c1=$(cpu_us "$pid")
        /usr/bin/python3 - "$WORK/out.json" "$name" "$tname" "$((c1 - c0))" >> "$RESULTS" <<'PY'
import json, sys
text = open(sys.argv[1]).read()  # the nbd engine prints a line before the JSON
j = json.loads(text[text.index("{"):])["jobs"][0]
# A mixed job counts both sides: IOPS and bandwidth summed, latency and p99
# of the writes (the side a FLUSH waits on).
sides = [j[d] for d in ("read", "write") if j[d]["io_bytes"] > 0]
side = sides[-1]
lat = side["clat_ns"]
p99 = lat.get("percentile", {}).get("99.000000", 0)
ios = sum(s["total_ios"] for s in sides) or 1
iops = sum(s["iops"] for s in sides)
bw = sum(s["bw"] for s in sides)
# fio's own CPU (its usr/sys are percent of one CPU over the job's run):
# server and client share the two cores, so both sides' cost sets the rate.
client = (j["usr_cpu"] + j["sys_cpu"]) / 100 * j["job_runtime"] * 1000 / ios
print("\t".join([sys.argv[2], sys.argv[3], f"{iops:.0f}", f"{bw / 1024:.1f}",
                 f"{lat['mean'] / 1000:.1f}", f"{p99 / 1000:.1f}", f"{int(sys.argv[4]) / ios:.1f}",
                 f"{client:.1f}"]))
PY
    done
done

# Bulk, into fresh targets.
head -c "${SIZE_MIB}M" /dev/urandom > "$WORK/src.img"
$VOL create bulk --size "${SIZE_MIB}M" >/dev/null
BULK_URIS=("$($VOL attach bulk)" "nbd://127.0.0.1:$KPORT/" "nbd://127.0.0.1:$QPORT1/bench" "nbd://127.0.0.1:$QPORT2/bench")
BULK_FILES=("" nbdkit.img qemu-default.img qemu-none.img)
BULK="$WORK/bulk.tsv"
: > "$BULK"
# Two passes, the second in reverse order, and every timed copy starts
# with prime_memory (common.sh): a copy whose page cache came from memory
# the VM had handed back to its host ran at a third to a half of its rate
# whoever served it, which made the first copy of a series the slow one
# and, before the priming, made volumed's passes 282-368 MiB/s in some
# runs. Printed beside each copy: the MiB the VM handed back during it,
# and the server's CPU seconds for the write (1 GiB: 0.6-0.8 s when the
# memory is warm, 2.4-4.9 s in the slow state, mostly the kernel's copy
# into new page-cache folios and writers spinning on the inode lock).
# And one uncounted copy of the same size into a scratch file first, its
# rate printed beside the passes: a copy with no server in it, which tells
# the machine's state at the time from the servers'.
truncate -s "${SIZE_MIB}M" "$WORK/warm.img"
t0=$(now); nbdcopy -C 4 --flush "$WORK/src.img" "$WORK/warm.img"; t1=$(now)
WARM=$(awk -v m="$SIZE_MIB" -v a="$t0" -v b="$t1" 'BEGIN { printf "%.0f", m / (b - a) }')
rm -f "$WORK/warm.img"
sync
ORDER=("${!TARGETS[@]}")
REVERSED=()
for ((j = ${#ORDER[@]} - 1; j >= 0; j--)); do REVERSED+=("${ORDER[$j]}"); done
for i in "${ORDER[@]}" "${REVERSED[@]}"; do
    tname=${TARGETS[$i]%%:*}
    if [ -n "${BULK_FILES[$i]}" ]; then
        truncate -s 0 "$WORK/${BULK_FILES[$i]}"
        truncate -s "${SIZE_MIB}M" "$WORK/${BULK_FILES[$i]}"
    else
        # A fresh volume for each pass.
        $VOL detach bulk >/dev/null
        $VOL delete bulk >/dev/null
        $VOL create bulk --size "${SIZE_MIB}M" >/dev/null
        BULK_URIS[$i]=$($VOL attach bulk)
    fi
    sync
    prime_memory "$SIZE_MIB"
    rest=${TARGETS[$i]#*:}; pid=${rest%%:*}
    r0=$(reported_kib); c0=$(cpu_us "$pid")
    t0=$(now); nbdcopy -C 4 --flush "$WORK/src.img" "${BULK_URIS[$i]}"; t1=$(now)
    r1=$(reported_kib); c1=$(cpu_us "$pid")
    nbdcopy -C 4 "${BULK_URIS[$i]}" null:; t2=$(now)
    awk -v t="$tname" -v m="$SIZE_MIB" -v a="$t0" -v b="$t1" -v c="$t2" -v r=$(((r1 - r0) / 1024)) -v u=$((c1 - c0)) \
        'BEGIN { printf "%s\t%f\t%f\t%d\t%.2f\n", t, m / (b - a), m / (c - b), r, u / 1e6 }' >> "$BULK"
done

echo "fill: ${FILL_BS} writes, ${SIZE_MIB} MiB, ${RUNTIME} s per job"
/usr/bin/python3 - "$RESULTS" <<'PY'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
print(f"{'job':<18} {'target':<18} {'IOPS':>9} {'MiB/s':>9} {'mean us':>9} {'p99 us':>9} {'cpu us/io':>10} {'fio us/io':>10}")
for r in rows:
    print(f"{r[0]:<18} {r[1]:<18} {r[2]:>9} {r[3]:>9} {r[4]:>9} {r[5]:>9} {r[6]:>10} {r[7]:>10}")
print()
peers = ["nbdkit(file)", "qemu-nbd(default)", "qemu-nbd(none)"]
print(f"{'job':<18}" + "".join(f"{'vs ' + p:>22}" for p in peers) + f"{'vs best':>10}")
jobs = []
for r in rows:
    if r[0] not in jobs:
        jobs.append(r[0])
for job in jobs:
    by = {r[1]: float(r[2]) for r in rows if r[0] == job}
    v = by["volumed"]
    best = max(by[p] for p in peers)
    print(f"{job:<18}" + "".join(f"{v / by[p]:>21.2f}x" for p in peers) + f"{v / best:>9.2f}x")
PY
echo
echo "bulk: nbdcopy -C 4 of ${SIZE_MIB} MiB random data into fresh targets (--flush), then read back to null;"
echo "two passes (the second in reverse order), each ratio within its pass;"
echo "the uncounted warm-up copy, file to file, ran at $WARM MiB/s; MiB the VM handed back to its host during each write copy:"
/usr/bin/python3 - "$BULK" <<'PY'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
n = len(rows) // 2
passes = [{r[0]: (float(r[1]), float(r[2]), int(r[3]), r[4]) for r in rows[:n]},
          {r[0]: (float(r[1]), float(r[2]), int(r[3]), r[4]) for r in rows[n:]}]
print(f"{'target':<18} {'write MiB/s':>14} {'read MiB/s':>14} {'volumed/it write':>18} {'read':>12}"
      f" {'MiB handed back':>16} {'server CPU s':>14}")
for t in passes[0]:
    a, b = passes[0][t], passes[1][t]
    va, vb = passes[0]["volumed"], passes[1]["volumed"]
    print(f"{t:<18} {a[0]:>6.0f} / {b[0]:<5.0f} {a[1]:>6.0f} / {b[1]:<5.0f}"
          f" {va[0] / a[0]:>9.2f}x / {vb[0] / b[0]:.2f}x {va[1] / a[1]:>5.2f}x / {vb[1] / b[1]:.2f}x"
          f" {a[2]:>8} / {b[2]:<7} {a[3]:>6} / {b[3]}")
PY
