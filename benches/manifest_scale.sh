#!/usr/bin/env bash
# Metadata that scales: a synthetic fully written volume (CHUNKS chunks of
# 512 KiB, all naming 4 chunk objects; 32 Mi chunks = 16 TiB by default)
# built as a format-2 manifest with the `snapshot` crate in a local store,
# restored in the real daemon, and measured:
#   build        the helper's time, pages and bytes (and what format 1 would take)
#   restore      `vol create --from-snapshot --no-hydrate` + `vol attach`
#   rss          the daemon's VmRSS after the restore, the first read, the snapshots
#   first read   one 4 KiB NBD read in the middle of the volume (libnbd, connected first)
#   snapshot     one 4 KiB write, then `vol snapshot create --wait`: seconds,
#                the snapshot's uploaded_bytes, and the store's growth (root included)
#   gc           SNAPS snapshots of one 4 KiB write each in all (default 100),
#                then `vol gc --grace 0s`: seconds and what it marked
#
# Usage: benches/manifest_scale.sh [chunks] [snapshots]
#   (defaults 33554432 and 100; BIN=target/debug to skip the release build)
set -euo pipefail
cd "$(dirname "$0")/.."
CHUNKS=${1:-33554432}
SNAPS=${2:-100}
CS=$((512 << 10))
if [ -z "${BIN:-}" ]; then
    cargo build --release --quiet --workspace --bins
    BIN=target/release
fi
NAME=manifestscale
# shellcheck source=benches/common.sh
. benches/common.sh
STORE=$WORK/store
DATA=$WORK/data
mkdir -p "$STORE" "$DATA"

rss_mib() { awk '/VmRSS/ {printf "%.0f", $2 / 1024}' "/proc/$1/status"; }
store_bytes() { du -sb "$STORE" | cut -f1; }

echo "# $CHUNKS chunks of 512 KiB ($((CHUNKS * CS >> 30)) GiB), $SNAPS snapshots"
BUILD=$("$BIN/manifest_scale" "file://$STORE" "$CHUNKS" "$CS" 4)
echo "build       $BUILD"
SNAP=$(echo "$BUILD" | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')

PORT=$(free_port)
start() { # volumed on $DATA; sets VPID
    VOLUMED_STORE="file://$STORE" "$BIN/volumed" --data-dir "$DATA" --nbd-listen "127.0.0.1:$PORT" 2>>"$WORK/volumed.log" &
    VPID=$!; PIDS+=($VPID)
    for _ in $(seq 300); do [ -S "$DATA/volumed.sock" ] && $VOL list >/dev/null 2>&1 && return 0; sleep 0.02; done
    echo "volumed did not start; see $WORK/volumed.log" >&2; return 1
}
VOL="$BIN/vol --socket $DATA/volumed.sock"
start
echo "rss idle    $(rss_mib $VPID) MiB"

t0=$(now)
$VOL create big --from-snapshot "$SNAP" --no-hydrate >/dev/null
$VOL attach big >/dev/null
t1=$(now)
echo "restore     $(echo "$t1 - $t0" | bc) s (create + attach)"
echo "rss         $(rss_mib $VPID) MiB after the restore"

URI="nbd://127.0.0.1:$PORT/big"
/usr/bin/python3 - "$URI" "$((CHUNKS * CS / 2))" <<'PY'
import sys, time, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
off = int(sys.argv[2])
t = time.monotonic()
buf = h.pread(4096, off)
first = time.monotonic() - t
t = time.monotonic()
h.pread(4096, off + (3 << 30))
other = time.monotonic() - t
print(f"first read  {first * 1000:.1f} ms (another page: {other * 1000:.1f} ms)")
PY
echo "rss         $(rss_mib $VPID) MiB after reads"

write4k() { # offset: one 4 KiB write and a flush over NBD
    /usr/bin/python3 - "$URI" "$1" <<'PY'
import sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pwrite(b"\xa5" * 4096, int(sys.argv[2]))
h.flush()
PY
}

# The first snapshot of the restored volume: its parent is the synthetic one.
write4k $((CS * 1000 + 4096))
before=$(store_bytes)
t0=$(now)
S=$($VOL --json snapshot create big --wait)
t1=$(now)
after=$(store_bytes)
UP=$(echo "$S" | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["uploaded_bytes"])')
echo "snapshot    $(echo "$t1 - $t0" | bc) s, uploaded_bytes $UP, store grew $((after - before)) bytes (root included)"

# The rest: one 4 KiB write each, in pages spread over the volume.
STEP=$(((CHUNKS / SNAPS) * CS))
t0=$(now)
for i in $(seq 2 "$SNAPS"); do
    write4k $((STEP * i + 8192))
    $VOL snapshot create big --wait >/dev/null
done
t1=$(now)
echo "snapshots   $((SNAPS - 1)) more in $(echo "$t1 - $t0" | bc) s (write + snapshot each)"
echo "rss         $(rss_mib $VPID) MiB after the snapshots"

t0=$(now)
G=$($VOL --json gc --grace 0s)
t1=$(now)
echo "gc          $(echo "$t1 - $t0" | bc) s over $SNAPS snapshots + the synthetic one: $(echo "$G" | tr -d '\n ')"
echo "store       $(store_bytes) bytes; pages $(find "$STORE/pages" -type f | wc -l)"
echo "rss         $(rss_mib $VPID) MiB after gc"

# A clean restart: the restored volume reopens from its root and detach log.
kill -TERM "$VPID"; wait "$VPID" 2>/dev/null || true
rm -f "$DATA/volumed.sock"
t0=$(now)
start
t1=$(now)
echo "reopen      $(echo "$t1 - $t0" | bc) s (start until the API answers), rss $(rss_mib $VPID) MiB"
/usr/bin/python3 - "$URI" "$((CHUNKS * CS / 4))" <<'PY'
import sys, time, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
t = time.monotonic()
h.pread(4096, int(sys.argv[2]))
print(f"first read  {(time.monotonic() - t) * 1000:.1f} ms after the restart")
PY
