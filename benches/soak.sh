#!/usr/bin/env bash
# Soak: volumed under sustained verified traffic with snapshots, restores and
# gc going on, watching for wrong bytes and for growth of memory and file
# descriptors. Not part of CI.
#
# - 3 volumes, each with 2 fio jobs (2 NBD connections) of random 4k writes
#   with crc32c verification (verify_backlog: written blocks are read back
#   and checked continuously, and fio fails on any mismatch);
# - every 30 s a snapshot of each volume; old snapshots deleted and
#   `vol gc --grace 0s` run (safe while snapshots are in flight: see
#   snapshot/src/gc.rs);
# - every 3 minutes a restore check: random bytes copied into a 4th volume,
#   snapshotted, restored lazily and with hydration, both read back and
#   compared with the bytes;
# - volumed's RSS and open file descriptors sampled every cycle.
# Fails on any fio verification error, byte mismatch, or RSS grown by more
# than 50 % (or FDs by more than 32) between the first and last fifth.
#
# Usage: benches/soak.sh [minutes]   (default 30)
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=${1:-30}
cargo build --release --quiet --workspace --bins
BIN=target/release
command -v fio nbdcopy cmp >/dev/null
NAME=soak
# shellcheck source=benches/common.sh
. benches/common.sh
start_volumed "$WORK/vd" "file://$WORK/store"
DEADLINE=$(( $(date +%s) + MINUTES * 60 ))
FIO_PIDS=()
for v in a b c; do
    $VOL create "$v" --size 256M >/dev/null
    URI=$($VOL attach "$v")
    fio --name="soak-$v" --ioengine=nbd --uri="$URI" --rw=randwrite --bs=4k --iodepth=8 \
        --size=128M --numjobs=2 --offset_increment=128M --time_based --runtime=$((MINUTES * 60)) \
        --verify=crc32c --verify_backlog=1024 --verify_fatal=1 --verify_state_save=0 --group_reporting \
        >"$WORK/fio-$v.log" 2>&1 &
    FIO_PIDS+=($!); PIDS+=($!)
done
$VOL create still --size 64M >/dev/null
STILL=$($VOL attach still)

sample() { # -> "rss_kib fds"
    echo "$(awk '/VmRSS/ {print $2}' "/proc/$VPID/status") $(ls "/proc/$VPID/fd" | wc -l)"
}
: >"$WORK/samples"
cycles=0 snaps=0 restores=0 gcs=0 last_restore=0
while [ "$(date +%s)" -lt "$DEADLINE" ]; do
    cycles=$((cycles + 1))
    for v in a b c; do
        $VOL snapshot create "$v" --wait >/dev/null
        snaps=$((snaps + 1))
        # Keep the newest three snapshots of each volume.
        for old in $($VOL --json snapshot list --volume "$v" | /usr/bin/python3 -c \
                'import json,sys; print(" ".join(s["id"] for s in json.load(sys.stdin)[:-3]))'); do
            $VOL snapshot delete "$old" >/dev/null
        done
    done
    $VOL gc --grace 0s >/dev/null
    gcs=$((gcs + 1))
    if [ $(( $(date +%s) - last_restore )) -ge 180 ]; then
        last_restore=$(date +%s)
        head -c 64M /dev/urandom >"$WORK/still.img"
        nbdcopy "$WORK/still.img" "$STILL"
        ID=$($VOL --json snapshot create still --wait | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
        for mode in lazy hydrated; do
            flag=--no-hydrate; [ $mode = hydrated ] && flag=--wait
            $VOL create "r-$mode" --from-snapshot "$ID" $flag >/dev/null
            nbdcopy "$($VOL attach "r-$mode")" "$WORK/r.img"
            cmp "$WORK/still.img" "$WORK/r.img" || { echo "soak: $mode restore of $ID differs"; exit 1; }
            $VOL detach "r-$mode" >/dev/null; $VOL delete "r-$mode" >/dev/null
            rm -f "$WORK/r.img"
        done
        restores=$((restores + 2))
    fi
    for p in "${FIO_PIDS[@]}"; do
        kill -0 "$p" 2>/dev/null || { wait "$p" || { echo "soak: fio failed"; cat "$WORK"/fio-*.log; exit 1; }; }
    done
    sample >>"$WORK/samples"
    sleep 30
done
for p in "${FIO_PIDS[@]}"; do
    wait "$p" || { echo "soak: fio verification failed"; cat "$WORK"/fio-*.log; exit 1; }
done
/usr/bin/python3 - "$WORK/samples" "$MINUTES" "$cycles" "$snaps" "$restores" "$gcs" <<'PY'
import sys
rows = [tuple(map(int, l.split())) for l in open(sys.argv[1]) if l.strip()]
minutes, cycles, snaps, restores, gcs = sys.argv[2:]
n = max(1, len(rows) // 5)
first, last = rows[:n], rows[-n:]
avg = lambda xs, i: sum(x[i] for x in xs) / len(xs)
rss0, rss1, fd0, fd1 = avg(first, 0), avg(last, 0), avg(first, 1), avg(last, 1)
print(f"soak: {minutes} min, {cycles} cycles, {snaps} snapshots, {restores} restores compared, {gcs} gc runs")
print(f"soak: RSS {rss0/1024:.1f} -> {rss1/1024:.1f} MiB, fds {fd0:.0f} -> {fd1:.0f}")
if rss1 > rss0 * 1.5 or fd1 > fd0 + 32:
    sys.exit("soak: memory or descriptors grew")
print("soak: ok")
PY
grep -h "err=" "$WORK"/fio-*.log | head -3
