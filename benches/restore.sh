#!/usr/bin/env bash
# Restore benchmarks against the local store and SeaweedFS (S3), in one run.
#
# For each store, a volume of SIZE_MIB random data is snapshotted, then:
#   first byte   `vol create --from-snapshot` + attach + one 4 KiB read over
#                NBD, end to end (median and worst of 5 restores)
#   randread     fio's nbd engine, 4k random reads at QD1 for 10 s, on a
#                restored volume that was never hydrated (first touches fetch
#                from the store) and on the local source volume
#   hydration    `vol create --from-snapshot --wait` with the chunk cache off,
#                as MiB/s, and the store's raw GET rate for the same objects
#                at hydration's concurrency (16), and their ratio
#
# Usage: benches/restore.sh [size-MiB]   (default 4096)
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${1:-4096}
cargo build --release --quiet --workspace --bins
BIN=target/release
command -v fio nbdcopy >/dev/null
NAME=restorebench
# shellcheck source=benches/common.sh
. benches/common.sh
# The source, both stores and the restored volumes: 33 GiB for 4 GiB.
need_space $((SIZE_MIB * 9))
start_weed
head -c "${SIZE_MIB}M" /dev/urandom > "$WORK/src.img"

randread() { # uri -> "mean_us p99_us iops"
    fio --name=rr --ioengine=nbd --uri="$1" --rw=randread --bs=4k --iodepth=1 \
        --size="${SIZE_MIB}M" --time_based --runtime=10 --lat_percentiles=1 --output-format=json >"$WORK/fio.json" 2>/dev/null
    /usr/bin/python3 - "$WORK/fio.json" <<'PY'
import json, sys
text = open(sys.argv[1]).read()  # the nbd engine prints a line before the JSON
j = json.loads(text[text.index("{"):])["jobs"][0]["read"]
c = j["lat_ns"]
pct = c.get("percentile") or j["clat_ns"].get("percentile") or {}
p99 = pct.get("99.000000")
print(f'{c["mean"] / 1e3:.0f} {p99 / 1e3 if p99 else float("nan"):.0f} {j["iops"]:.0f}')
PY
}

for STORE in local s3; do
    case $STORE in
        local) URL="file://$WORK/store" ;;
        s3) URL="s3://volumed/restore" ;;
    esac
    start_volumed "$WORK/vd-$STORE" "$URL"
    $VOL create src --size "${SIZE_MIB}M" >/dev/null
    SRC=$($VOL attach src)
    nbdcopy "$WORK/src.img" "$SRC"
    ID=$($VOL --json snapshot create src --wait | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')

    # First byte: every restore starts with an empty cache.
    kill "$VPID"; wait "$VPID" 2>/dev/null || true
    rm -rf "$WORK/vd-$STORE/cache"
    start_volumed "$WORK/vd-$STORE" "$URL" --cache-size 0
    MS=()
    for i in 1 2 3 4 5; do
        MS+=("$(/usr/bin/python3 - "$BIN/vol" "$WORK/vd-$STORE/volumed.sock" "$ID" "fb$i" <<'PY'
import nbd, subprocess, sys, time
vol, sock, snap, name = sys.argv[1:]
t0 = time.monotonic()
subprocess.run([vol, "--socket", sock, "create", name, "--from-snapshot", snap, "--no-hydrate"], check=True, capture_output=True)
uri = subprocess.run([vol, "--socket", sock, "attach", name], check=True, capture_output=True, text=True).stdout.strip()
h = nbd.NBD(); h.connect_uri(uri)
h.pread(4096, 7 * (512 << 10) + 4096)
print(f"{(time.monotonic() - t0) * 1000:.1f}")
PY
)")
    done
    FB=$(printf '%s\n' "${MS[@]}" | sort -n)
    echo "$STORE first byte after create (ms, 5 restores): $(echo $FB | tr '\n' ' ')"

    # 4k random reads: never-hydrated restore vs the local source.
    $VOL create lazy --from-snapshot "$ID" --no-hydrate >/dev/null
    LAZY=$($VOL attach lazy)
    read -r LM LP LI <<<"$(randread "$LAZY")"
    SRC=$($VOL attach src)   # the restart moved the NBD port
    read -r SM SP SI <<<"$(randread "$SRC")"
    echo "$STORE randread 4k QD1: unhydrated mean ${LM}us p99 ${LP}us ${LI} IOPS; local mean ${SM}us p99 ${SP}us ${SI} IOPS"

    # Hydration with no cache, against the raw GET rate; with the CPU
    # seconds volumed spent, since both cores are shared with the store.
    # SeaweedFS's CPU too (zero for the local store): it serves the GETs
    # on the same two cores.
    C0=$(cpu_secs "$VPID"); W0=$(cpu_secs "$WEED_PID")
    T0=$(now)
    $VOL create hyd --from-snapshot "$ID" --wait >/dev/null
    T1=$(now)
    C1=$(cpu_secs "$VPID"); W1=$(cpu_secs "$WEED_PID")
    read -r GET OBJS BYTES <<<"$("$BIN/get_rate" "$URL" "$ID" 16)"
    W2=$(cpu_secs "$WEED_PID")
    /usr/bin/python3 -c "
s = $T1 - $T0; mib = $SIZE_MIB / s
print(f'$STORE hydration of ${SIZE_MIB} MiB: {s:.2f} s = {mib:.1f} MiB/s (volumed used {$C1 - $C0:.1f} CPU s, SeaweedFS {$W1 - $W0:.1f}); raw GET {float($GET):.1f} MiB/s ($OBJS objects, SeaweedFS {$W2 - $W1:.1f} CPU s); ratio {mib / float($GET):.2f}')"
    kill "$VPID"; wait "$VPID" 2>/dev/null || true
done
