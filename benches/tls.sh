#!/usr/bin/env bash
# NBD over TLS: volumed and qemu-nbd side by side in one run, each in
# plaintext and with TLS (the same throwaway CA and server certificate).
#
# For every target: nbdcopy reading the whole export to null: and writing
# it from a file (sequential, libnbd's default 4 connections x 64 requests
# in flight), and 4k random reads at queue depth 1 from libnbd's Python
# bindings (latency, mean and p99). Prints a table and the TLS cost and the
# volumed/qemu-nbd ratios.
#
# Usage: benches/tls.sh [size-MiB] [randread-count]
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${1:-1024}
COUNT=${2:-5000}
command -v qemu-nbd nbdcopy openssl >/dev/null

cargo build --release --quiet --workspace --bins
BIN=target/release
NAME=tls
# shellcheck source=benches/common.sh
. benches/common.sh

# A CA and a server certificate for 127.0.0.1, in qemu's file layout.
PKI=$WORK/pki
mkdir -p "$PKI/client"
(
    cd "$PKI"
    ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
    openssl req -x509 "${ec[@]}" -days 1 -subj "/CN=volumed bench ca" \
        -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign \
        -keyout ca-key.pem -out ca-cert.pem 2>/dev/null
    openssl req "${ec[@]}" -subj /CN=localhost -keyout server-key.pem -out server.csr 2>/dev/null
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' > server.ext
    openssl x509 -req -days 1 -in server.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial \
        -extfile server.ext -out server-cert.pem 2>/dev/null
    cp ca-cert.pem client/
)

head -c "${SIZE_MIB}M" /dev/urandom > "$WORK/src.img"

# volumed, plaintext and TLS: two daemons, one volume each.
start_volumed "$WORK/plain" "file://$WORK/plain-store"
VOL_PLAIN=$VOL
start_volumed "$WORK/tls" "file://$WORK/tls-store" \
    --nbd-tls-cert "$PKI/server-cert.pem" --nbd-tls-key "$PKI/server-key.pem"
VOL_TLS=$VOL
for v in "$VOL_PLAIN" "$VOL_TLS"; do
    $v create bench --size "${SIZE_MIB}M" >/dev/null
    $v attach bench >/dev/null
done
V_PLAIN=$($VOL_PLAIN inspect bench --json | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["uri"])')
V_TLS=$($VOL_TLS inspect bench --json | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["uri"])')
V_TLS="$V_TLS?tls-certificates=$PKI/client"

# qemu-nbd, plaintext and TLS, each on its own copy of a file.
cp "$WORK/src.img" "$WORK/q-plain.img"
cp "$WORK/src.img" "$WORK/q-tls.img"
QP=$(free_port)
qemu-nbd -f raw -x bench -b 127.0.0.1 -p "$QP" -t -e 16 "$WORK/q-plain.img" &
PIDS+=($!)
QT=$(free_port)
qemu-nbd -f raw -x bench -b 127.0.0.1 -p "$QT" -t -e 16 \
    --object "tls-creds-x509,id=tls0,dir=$PKI,endpoint=server,verify-peer=no" \
    --tls-creds tls0 "$WORK/q-tls.img" &
PIDS+=($!)
sleep 1

TARGETS=(
  "volumed:$V_PLAIN"
  "volumed+tls:$V_TLS"
  "qemu-nbd:nbd://127.0.0.1:$QP/bench"
  "qemu-nbd+tls:nbds://127.0.0.1:$QT/bench?tls-certificates=$PKI/client"
)

RESULTS="$WORK/results.tsv"
: > "$RESULTS"
for target in "${TARGETS[@]}"; do
    tname=${target%%:*}
    uri=${target#*:}
    t0=$(now); nbdcopy "$WORK/src.img" "$uri"; t1=$(now)
    nbdcopy "$uri" null:; t2=$(now)
    lat=$(/usr/bin/python3 - "$uri" "$COUNT" "$SIZE_MIB" <<'PY'
import nbd, random, sys, time
uri, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) << 20
h = nbd.NBD()
h.set_uri_allow_local_file(True)
h.connect_uri(uri)
rng = random.Random(7)
lat = []
for _ in range(count):
    off = rng.randrange(size // 4096) * 4096
    t = time.perf_counter_ns()
    h.pread(4096, off)
    lat.append(time.perf_counter_ns() - t)
h.shutdown()
lat.sort()
print(f"{sum(lat) / len(lat) / 1000:.1f}\t{lat[int(len(lat) * 0.99)] / 1000:.1f}")
PY
)
    /usr/bin/python3 - "$tname" "$SIZE_MIB" "$t0" "$t1" "$t2" "$lat" >> "$RESULTS" <<'PY'
import sys
name, mib, t0, t1, t2, lat = sys.argv[1], int(sys.argv[2]), *map(float, sys.argv[3:6]), sys.argv[6]
print(f"{name}\t{mib / (t1 - t0):.0f}\t{mib / (t2 - t1):.0f}\t{lat}")
PY
done

/usr/bin/python3 - "$RESULTS" <<'PY'
import sys
rows = {r[0]: r[1:] for r in (l.rstrip("\n").split("\t") for l in open(sys.argv[1]))}
print(f"{'target':<14} {'write MiB/s':>12} {'read MiB/s':>11} {'4k QD1 mean us':>15} {'p99 us':>8}")
for name, (w, r, mean, p99) in rows.items():
    print(f"{name:<14} {w:>12} {r:>11} {mean:>15} {p99:>8}")
print()
f = lambda n, i: float(rows[n][i])
for a, b, what in [("volumed+tls", "volumed", "TLS cost, volumed"),
                   ("qemu-nbd+tls", "qemu-nbd", "TLS cost, qemu-nbd"),
                   ("volumed+tls", "qemu-nbd+tls", "volumed/qemu-nbd with TLS")]:
    print(f"{what:<28} write {f(a, 0) / f(b, 0):.2f}x  read {f(a, 1) / f(b, 1):.2f}x  "
          f"4k latency {f(a, 2) / f(b, 2):.2f}x")
PY
