#!/usr/bin/env bash
# Runs a benchmark script with its scratch dir on XFS: a sparse image file
# formatted XFS and loop-mounted (root; xfsprogs), removed at exit.
#
# Usage: benches/xfs.sh SIZE-GiB benches/SCRIPT.sh [ARGS...]
set -euo pipefail
cd "$(dirname "$0")/.."
GIB=$1; shift
command -v mkfs.xfs >/dev/null || { echo "mkfs.xfs missing: apt-get install xfsprogs" >&2; exit 1; }
IMG=$(mktemp /var/tmp/volumed-xfs.XXXXXX.img)
MNT=$(mktemp -d /var/tmp/volumed-xfs.XXXXXX)
cleanup() {
    umount "$MNT" 2>/dev/null || true
    rmdir "$MNT" 2>/dev/null || true
    rm -f "$IMG"
}
trap cleanup EXIT
truncate -s "${GIB}G" "$IMG"
mkfs.xfs -q -f "$IMG"
mount -o loop "$IMG" "$MNT"
echo "scratch on $(findmnt -no FSTYPE,OPTIONS "$MNT")"
BENCH_DIR="$MNT" "$@"
