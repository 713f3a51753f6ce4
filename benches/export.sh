#!/usr/bin/env bash
# Image export against qemu-img, in one run, local store: a snapshot of an
# imported image (SIZE_MIB, 60 % holes, 30 % random data, 10 % written
# zeros per MiB) exported by
#
#   vol export SNAP out.raw                  (sparse raw)
#   vol export SNAP out.qcow2 --format qcow2
# and, from a volume restored from the same snapshot and fully hydrated
# (vol create --from-snapshot --wait, not timed), attached over NBD:
#   qemu-img convert -t writeback -O raw   nbd+unix://... out.raw
#   qemu-img convert -t writeback -O qcow2 nbd+unix://... out.qcow2
# (-t writeback flushes the output at the end, as vol export syncs its
# file before the job completes; qemu-img convert's default, unsafe, does not)
#
# Every round runs the four in turn, each after a sync, so the ratios
# compare runs that saw the same machine. The outputs are checked with
# qemu-img compare against the source image.
#
# Usage: benches/export.sh [size-MiB] [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${1:-2048}
ROUNDS=${2:-3}
cargo build --release --quiet --workspace --bins
BIN=target/release
command -v qemu-img >/dev/null
NAME=exportbench
# shellcheck source=benches/common.sh
. benches/common.sh

make_image "$WORK/img.raw" "$SIZE_MIB"
mkdir -p "$WORK/d"; chmod 700 "$WORK/d"
start_volumed "$WORK/d" "file://$WORK/store"
json() { /usr/bin/python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }
$VOL import "$WORK/img.raw" src --snapshot >/dev/null
snap=$($VOL --json snapshot list | /usr/bin/python3 -c 'import json,sys; d=json.load(sys.stdin); l=d["snapshots"] if isinstance(d,dict) else d; print(l[0]["id"])')
$VOL create restored --from-snapshot "$snap" --wait >/dev/null
uri=$($VOL --json attach restored | json '["unix_uri"]')
secs() { local t0; sync; t0=$(now); "$@" >/dev/null; echo "$(now) - $t0" | bc -l; }
rate() { echo "scale=0; $SIZE_MIB / $1" | bc -l; }
R_RAW=(); R_QCOW=()
for r in $(seq "$ROUNDS"); do
    echo "== round $r of $ROUNDS"
    rm -f "$WORK"/out.*
    t_vr=$(secs $VOL export "$snap" "$WORK/out.v.raw")
    t_qr=$(secs qemu-img convert -t writeback -f raw -O raw "$uri" "$WORK/out.q.raw")
    t_vq=$(secs $VOL export "$snap" "$WORK/out.v.qcow2" --format qcow2)
    t_qq=$(secs qemu-img convert -t writeback -f raw -O qcow2 "$uri" "$WORK/out.q.qcow2")
    for f in out.v.raw out.q.raw out.v.qcow2 out.q.qcow2; do
        qemu-img compare -q "$WORK/img.raw" "$WORK/$f" || { echo "$f differs from the image" >&2; exit 1; }
    done
    printf '%-32s %8s %8s %14s\n' "path" "s" "MiB/s" "file blocks"
    printf '%-32s %8.2f %8s %14s\n' "vol export -> raw" "$t_vr" "$(rate "$t_vr")" "$(du -B1 "$WORK/out.v.raw" | cut -f1)"
    printf '%-32s %8.2f %8s %14s\n' "qemu-img convert NBD -> raw" "$t_qr" "$(rate "$t_qr")" "$(du -B1 "$WORK/out.q.raw" | cut -f1)"
    printf '%-32s %8.2f %8s %14s\n' "vol export -> qcow2" "$t_vq" "$(rate "$t_vq")" "$(du -B1 "$WORK/out.v.qcow2" | cut -f1)"
    printf '%-32s %8.2f %8s %14s\n' "qemu-img convert NBD -> qcow2" "$t_qq" "$(rate "$t_qq")" "$(du -B1 "$WORK/out.q.qcow2" | cut -f1)"
    R_RAW+=("$(echo "$t_qr / $t_vr" | bc -l)")
    R_QCOW+=("$(echo "$t_qq / $t_vq" | bc -l)")
    printf 'vol export / qemu-img: raw %.2fx, qcow2 %.2fx\n' "${R_RAW[-1]}" "${R_QCOW[-1]}"
done
spread() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {printf "min %.2fx  median %.2fx  max %.2fx", a[1], a[int((NR+1)/2)], a[NR]}'; }
echo "== $ROUNDS rounds"
echo "vol export raw   / qemu-img from a restored volume: $(spread "${R_RAW[@]}")"
echo "vol export qcow2 / qemu-img from a restored volume: $(spread "${R_QCOW[@]}")"
