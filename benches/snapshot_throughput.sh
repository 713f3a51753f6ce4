#!/usr/bin/env bash
# Snapshot throughput against the local store and SeaweedFS (S3), in one run.
#
# For each store: a volume of SIZE_GIB filled with random data (the worst
# case: nothing compresses, nothing dedups), then
#   full         the first snapshot, every chunk read, hashed, uploaded
#   5% changed   5% of the chunks rewritten, then an incremental snapshot
#   unchanged    a snapshot with nothing changed
# and the store's raw PUT rate for 1 GiB of random chunk-sized objects at the
# snapshot job's concurrency, so the full snapshot reads as a fraction of it.
#
# Usage: benches/snapshot_throughput.sh [size-GiB]
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_GIB=${1:-4}
cargo build --release --quiet --workspace --bins
BIN=target/release
NAME=snapbench
# shellcheck source=benches/common.sh
. benches/common.sh
start_weed

head -c "${SIZE_GIB}G" /dev/urandom > "$WORK/src.img"
CHUNKS=$((SIZE_GIB * 2048))   # 512 KiB chunks
CHANGE=$((CHUNKS / 20))

printf '%-6s %-11s %8s %10s %10s %12s %12s\n' store snapshot seconds changed uploaded logical_GiB/s upload_GiB/s
for STORE in local s3; do
    case $STORE in
        local) URL="file://$WORK/store" ;;
        s3) URL="s3://volumed/bench" ;;
    esac
    start_volumed "$WORK/vd-$STORE" "$URL"
    $VOL create bench --size "${SIZE_GIB}G" >/dev/null
    URI=$($VOL attach bench)
    nbdcopy "$WORK/src.img" "$URI"
    snap() {
        local t0 t1 json
        t0=$(now); json=$($VOL --json snapshot create bench --wait); t1=$(now)
        /usr/bin/python3 - "$STORE" "$1" "$t0" "$t1" "$json" <<'PY'
import json, sys
store, name, t0, t1, j = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), json.loads(sys.argv[5])
s = t1 - t0
gib = 1 << 30
print(f"{store:<6} {name:<11} {s:8.2f} {j['changed_chunks']:10d} {j['uploaded_bytes'] / gib:9.2f}Gi "
      f"{j['logical_bytes'] / gib / s:12.2f} {j['uploaded_bytes'] / gib / s:12.2f}")
PY
    }
    snap full
    # Rewrite 5% of the chunks, spread over the volume.
    /usr/bin/python3 - "$URI" "$CHUNKS" "$CHANGE" <<'PY'
import nbd, os, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
chunks, change = int(sys.argv[2]), int(sys.argv[3])
for i in range(change):
    h.pwrite(os.urandom(512 << 10), (i * (chunks // change)) * (512 << 10))
h.flush(); h.shutdown()
PY
    snap "5%-changed"
    snap unchanged
    RATE=$("$BIN/put_rate" "$URL" 1024 512 16)
    echo "$STORE raw PUT rate: $RATE MiB/s (1 GiB of 512 KiB random objects, 16 in flight)"
    kill "$VPID"; wait "$VPID" 2>/dev/null || true
done
