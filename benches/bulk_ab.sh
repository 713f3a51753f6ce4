#!/usr/bin/env bash
# Bulk copies, A/B: two volumed binaries and nbdkit's file plugin, each
# round in another order, into fresh targets (a new volume, nbdkit's file
# cut to empty), each copy started by prime_memory (common.sh) as
# nbd_peers.sh does: `nbdcopy -C 4 --flush` of SIZE_MIB random data, timed
# with its FLUSH, then read back to null. Printed per copy: target, write
# MiB/s, read MiB/s, server CPU seconds for the write, and the MiB the VM
# handed back to its host during it (the slow state: see common.sh).
#
# Usage: benches/bulk_ab.sh ROUNDS SIZE_MIB OLD_BINARY NEW_BINARY
set -euo pipefail
cd "$(dirname "$0")/.."
ITER=$1 SIZE_MIB=$2 OLD=$3 NEW=$4
command -v nbdkit nbdcopy >/dev/null
cargo build --release --quiet --workspace --bins
BIN=target/release
NAME=bulkab
# shellcheck source=benches/common.sh
. benches/common.sh
need_space $((SIZE_MIB * 4))
mkdir -p "$WORK/a" "$WORK/b"
VOLUMED_BIN=$OLD start_volumed "$WORK/a" "file://$WORK/sa"; OPID=$VPID; OVOL=$VOL
VOLUMED_BIN=$NEW start_volumed "$WORK/b" "file://$WORK/sb"; NPID=$VPID; NVOL=$VOL
truncate -s "${SIZE_MIB}M" "$WORK/nbdkit.img"
KPORT=$(free_port)
nbdkit --foreground --exit-with-parent --ipaddr 127.0.0.1 --port "$KPORT" file "$WORK/nbdkit.img" &
KPID=$!; PIDS+=($KPID); sleep 1
head -c "${SIZE_MIB}M" /dev/urandom > "$WORK/src.img"
for v in "$OVOL" "$NVOL"; do $v create bulk --size "${SIZE_MIB}M" >/dev/null; $v attach bulk >/dev/null; done
printf "target\twrite\tread\tcpu s\thanded back MiB\n"
for ((k = 0; k < ITER; k++)); do
  case $((k % 3)) in 0) order=(old new kit);; 1) order=(new kit old);; 2) order=(kit old new);; esac
  for t in "${order[@]}"; do
    case $t in
      old|new) [ $t = old ] && { v=$OVOL; pid=$OPID; } || { v=$NVOL; pid=$NPID; }
        $v detach bulk >/dev/null; $v delete bulk >/dev/null; $v create bulk --size "${SIZE_MIB}M" >/dev/null; uri=$($v attach bulk);;
      kit) truncate -s 0 "$WORK/nbdkit.img"; truncate -s "${SIZE_MIB}M" "$WORK/nbdkit.img"; uri="nbd://127.0.0.1:$KPORT/"; pid=$KPID;;
    esac
    sync
    prime_memory "$SIZE_MIB"
    r0=$(reported_kib); c0=$(cpu_secs $pid)
    t0=$(now); nbdcopy -C 4 --flush "$WORK/src.img" "$uri"; t1=$(now)
    r1=$(reported_kib); c1=$(cpu_secs $pid)
    t2=$(now); nbdcopy -C 4 "$uri" null:; t3=$(now)
    awk -v t=$t -v m=$SIZE_MIB -v a=$t0 -v b=$t1 -v c=$t2 -v d=$t3 -v u0="$c0" -v u1="$c1" -v r=$(((r1 - r0) / 1024)) \
      'BEGIN { printf "%s\t%.0f\t%.0f\t%.2f\t%d\n", t, m / (b - a), m / (d - c), u1 - u0, r }'
  done
done
