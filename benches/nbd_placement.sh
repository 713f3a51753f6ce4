#!/usr/bin/env bash
# What CPU placement does to 4k random reads at QD1: volumed (polling on,
# and off with --nbd-poll 0s) and nbdkit's file plugin on the same
# 1 GiB of random data, fio's nbd engine, with server and fio
#   free   unpinned (the scheduler decides),
#   same   both pinned to CPU 0,
#   split  the server on CPU 1, fio on CPU 0.
# On a VM a sleeping vCPU is slow to wake, so "same" and "split" bound what
# the wake-ups between server and client cost. Prints IOPS per target.
#
# Usage: benches/nbd_placement.sh [rounds] [runtime-seconds]   (defaults 2 4)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-2} RUNTIME=${2:-4}
command -v fio nbdkit nbdcopy taskset >/dev/null
cargo build --release --quiet --workspace --bins
BIN=target/release
NAME=placement
# shellcheck source=benches/common.sh
. benches/common.sh

head -c 1024M /dev/urandom > "$WORK/raw"
start_volumed "$WORK/vd-poll" "file://$WORK/store"
POLL_PID=$VPID
$VOL create v --size 1024M >/dev/null
POLL_URI=$($VOL attach v)
nbdcopy "$WORK/raw" "$POLL_URI"
start_volumed "$WORK/vd-nopoll" "file://$WORK/store" --nbd-poll 0s
NOPOLL_PID=$VPID
$VOL create v --size 1024M >/dev/null
NOPOLL_URI=$($VOL attach v)
nbdcopy "$WORK/raw" "$NOPOLL_URI"
nbdkit -U "$WORK/kit.sock" -f file "$WORK/raw" &
KIT_PID=$!; PIDS+=($KIT_PID)
for _ in $(seq 50); do [ -S "$WORK/kit.sock" ] && break; sleep 0.1; done
KIT_URI="nbd+unix:///?socket=$WORK/kit.sock"
sync

iops() { # cpus uri
    taskset -c "$1" fio --name=rr --ioengine=nbd --uri="$2" --rw=randread --bs=4k --iodepth=1 \
        --size=1024M --time_based --runtime="$RUNTIME" --output-format=terse 2>/dev/null |
        awk -F';' 'NF > 50 {printf "%8.0f", $8}'
}
pin() { # pid cpus: every thread of the process
    for t in /proc/"$1"/task/*; do taskset -pc "$2" "${t##*/}" >/dev/null; done
}

printf '%-6s %-6s %12s %12s %12s\n' round place "volumed" "no polling" "nbdkit"
for r in $(seq "$ROUNDS"); do
    for place in free same split; do
        case $place in
            free) server=0-1 client=0-1 ;;
            same) server=0 client=0 ;;
            split) server=1 client=0 ;;
        esac
        for p in $POLL_PID $NOPOLL_PID $KIT_PID; do pin "$p" "$server"; done
        printf '%-6s %-6s %12s %12s %12s\n' "$r" "$place" \
            "$(iops "$client" "$POLL_URI")" "$(iops "$client" "$NOPOLL_URI")" "$(iops "$client" "$KIT_URI")"
    done
done
