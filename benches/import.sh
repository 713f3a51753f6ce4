#!/usr/bin/env bash
# Image import against qemu's own tools, in one run, local store.
#
#   qcow2 -> file     qemu-img convert -f qcow2 -O raw to a local file
#   qcow2 -> NBD      qemu-img convert -f qcow2 -O raw straight to an
#                     attached volume's NBD URI (-n, the volume made first)
#   qcow2 -> volume   vol import (qemu-nbd, our NBD client, zero detection)
#   raw pipe -> NBD   cat img | nbdcopy - nbd://... (writes every byte)
#   raw pipe -> vol   cat img | vol import - NAME
# and the allocation each leaves, against the image's data.
#
# The image is SIZE_MIB (default 2048) with 60 % holes, 30 % random data
# and 10 % written zeros per MiB.
#
# Every round runs all five paths in turn (the volumes removed after it),
# so the ratios compare runs that saw the same machine.
#
# Usage: benches/import.sh [size-MiB] [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${1:-2048}
ROUNDS=${2:-3}
cargo build --release --quiet --workspace --bins
BIN=target/release
command -v qemu-img qemu-nbd nbdcopy >/dev/null
NAME=importbench
# shellcheck source=benches/common.sh
. benches/common.sh

make_image "$WORK/img.raw" "$SIZE_MIB"
qemu-img convert -q -f raw -O qcow2 "$WORK/img.raw" "$WORK/img.qcow2"
data=$(qemu-img map -f raw --output=json "$WORK/img.raw" | /usr/bin/python3 -c \
    'import json,sys; print(sum(e["length"] for e in json.load(sys.stdin) if e["data"]))')
sync

mkdir -p "$WORK/d"; chmod 700 "$WORK/d"
start_volumed "$WORK/d" "file://$WORK/store"
# Each path starts with nothing dirty in the page cache: the writeback of
# the path before must not be charged to the next one.
secs() { local t0; sync; t0=$(now); "$@" >/dev/null; echo "$(now) - $t0" | bc -l; }
rate() { echo "scale=0; $SIZE_MIB / $1" | bc -l; }
alloc() { $VOL --json inspect "$1" | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["allocated_bytes"])'; }

round() {
    t_file=$(secs qemu-img convert -f qcow2 -O raw "$WORK/img.qcow2" "$WORK/out.raw")
    a_file=$(du -B1 "$WORK/out.raw" | cut -f1)
    rm -f "$WORK/out.raw"

    $VOL create q-nbd --size "${SIZE_MIB}M" >/dev/null
    uri=$($VOL --json attach q-nbd | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["unix_uri"])')
    t_nbd=$(secs qemu-img convert -n -f qcow2 -O raw "$WORK/img.qcow2" "$uri")
    $VOL detach q-nbd >/dev/null
    a_nbd=$(alloc q-nbd)

    t_vol=$(secs $VOL import "$WORK/img.qcow2" q-vol)
    a_vol=$(alloc q-vol)

    $VOL create p-nbd --size "${SIZE_MIB}M" >/dev/null
    uri=$($VOL --json attach p-nbd | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["unix_uri"])')
    sync; t0=$(now); cat "$WORK/img.raw" | nbdcopy - "$uri"; t_pnbd=$(echo "$(now) - $t0" | bc -l)
    $VOL detach p-nbd >/dev/null
    a_pnbd=$(alloc p-nbd)

    sync; t0=$(now); cat "$WORK/img.raw" | $VOL import - p-vol >/dev/null; t_pvol=$(echo "$(now) - $t0" | bc -l)
    a_pvol=$(alloc p-vol)

    printf '%-24s %8s %8s %14s\n' "path" "s" "MiB/s" "allocated"
    printf '%-24s %8.2f %8s %14s\n' "qcow2 -> file (qemu-img)" "$t_file" "$(rate "$t_file")" "$a_file"
    printf '%-24s %8.2f %8s %14s\n' "qcow2 -> NBD (qemu-img)" "$t_nbd" "$(rate "$t_nbd")" "$a_nbd"
    printf '%-24s %8.2f %8s %14s\n' "qcow2 -> vol import" "$t_vol" "$(rate "$t_vol")" "$a_vol"
    printf '%-24s %8.2f %8s %14s\n' "pipe -> nbdcopy" "$t_pnbd" "$(rate "$t_pnbd")" "$a_pnbd"
    printf '%-24s %8.2f %8s %14s\n' "pipe -> vol import -" "$t_pvol" "$(rate "$t_pvol")" "$a_pvol"
    echo "image data: $data bytes"
    printf 'vol import vs qemu-img to NBD: %.2fx; stdin vs nbdcopy: %.2fx\n' \
        "$(echo "$t_nbd / $t_vol" | bc -l)" "$(echo "$t_pnbd / $t_pvol" | bc -l)"
    R_FILE+=("$(echo "$t_nbd / $t_vol" | bc -l)")
    R_PIPE+=("$(echo "$t_pnbd / $t_pvol" | bc -l)")
    for v in q-nbd q-vol p-nbd p-vol; do $VOL delete "$v" >/dev/null; done
}

R_FILE=(); R_PIPE=()
for r in $(seq "$ROUNDS"); do
    echo "== round $r of $ROUNDS"
    round
done
spread() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {printf "min %.2fx  median %.2fx  max %.2fx", a[1], a[int((NR+1)/2)], a[NR]}'; }
echo "== $ROUNDS rounds"
echo "vol import / qemu-img convert to NBD: $(spread "${R_FILE[@]}")"
echo "vol import - / nbdcopy from a pipe:   $(spread "${R_PIPE[@]}")"
