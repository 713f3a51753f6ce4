# Shared by the benchmark scripts: a scratch dir removed at exit with every
# process started here, loopback ports, a clock, SeaweedFS (S3) on 127.0.0.1
# with every port chosen here, and volumed. Source it after setting BIN
# (release binaries) and NAME (names the scratch dir).

free_port() { /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now() { date +%s.%N; }
PIDS=()
# BENCH_DIR puts the scratch dir (data dirs, stores, the peers' files) on
# another filesystem, e.g. a loop-mounted XFS image (benches/xfs.sh).
WORK=$(mktemp -d "${BENCH_DIR:-/var/tmp}/volumed-$NAME.XXXXXX")
# A process that ignores SIGTERM (`weed mini` at times) gets SIGKILL after
# 10 s, so a benchmark never hangs in its cleanup.
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for _ in $(seq 100); do
        local alive=0
        # An exited child stays a zombie until `wait`: it counts as gone.
        for p in "${PIDS[@]}"; do
            case $(ps -o stat= -p "$p" 2>/dev/null) in "" | Z*) ;; *) alive=1 ;; esac
        done
        [ $alive = 0 ] && break
        sleep 0.1
    done
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK" "/dev/shm/volumed-bench-prime.$$"
}
trap cleanup EXIT

# Stops the run with one line when the scratch dir has less than $1 MiB
# free: a bench that fills the disk takes every other process down with it.
need_space() {
    local avail; avail=$(df --output=avail -m "$WORK" | tail -1)
    if [ "$avail" -lt "$1" ]; then
        echo "$(basename "$0"): needs about $(($1 / 1024)) GiB free under $WORK, has $((avail / 1024)) GiB" >&2
        exit 1
    fi
}

# Touches and frees $1 MiB of memory just before a timed run that fills
# the page cache. This VM hands memory that stays free for a few seconds
# back to its host (free page reporting,
# /sys/module/page_reporting/parameters), and the first touch of such
# memory is slow: a 1 GiB copy into a fresh file on nbdkit cost 2.4-2.6 s
# of server CPU (~470 MiB/s) after 15 s idle, 0.65-1.0 s (820-1014 MiB/s)
# right after this. Whichever server's run met that memory lost 2-3x, so
# every timed run that allocates page cache starts the same way.
# reported_kib: what the guest has handed back so far (0 where it has no
# such module); a run with a large difference across it met it anyway.
prime_memory() {
    dd if=/dev/zero of="/dev/shm/volumed-bench-prime.$$" bs=1M count="$1" status=none
    rm -f "/dev/shm/volumed-bench-prime.$$"
}
# Writes a $1 MiB file through the page cache on the benchmark's own
# filesystem, kept to the end: run it before the targets' fills. The first
# file written after a quiet spell keeps slower 4 KiB overwrites for as
# long as it stays cached (20-24 us of server CPU per write against 15-17,
# in ext4_block_write_begin, with the same folio sizes and page frames as
# the files written after it); priming tmpfs does not help, a file on the
# same filesystem does. Whichever target was filled first carried it:
# docs/performance.md, "The first file filled".
warm_fill() {
    dd if=/dev/zero of="$WORK/warm-fill" bs=1M count="$1" conv=fdatasync status=none
}
reported_kib() { cat /sys/module/page_reporting/parameters/reported_kib 2>/dev/null || echo 0; }

# Starts SeaweedFS with bucket `volumed` and exports the AWS_* variables
# volumed and the probes read; returns once the S3 port answers.
start_weed() {
    local weed=${WEED:-$(command -v weed)} p=()
    for _ in $(seq 10); do p+=("$(free_port)"); done
    export AWS_ACCESS_KEY_ID=volumedbench AWS_SECRET_ACCESS_KEY=volumedbenchsecret AWS_REGION=us-east-1
    "$weed" mini -dir="$WORK/weed" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
        -master.port="${p[0]}" -master.port.grpc="${p[1]}" -volume.port="${p[2]}" -volume.port.grpc="${p[3]}" \
        -filer.port="${p[4]}" -filer.port.grpc="${p[5]}" -s3.port="${p[6]}" -s3.port.grpc="${p[7]}" \
        -admin.port="${p[8]}" -admin.port.grpc="${p[9]}" -admin.ui=false -webdav=false \
        -s3.port.iceberg=0 -s3.port.lance=0 -bucket=volumed >"$WORK/weed.log" 2>&1 &
    WEED_PID=$!
    PIDS+=($WEED_PID)
    export AWS_ENDPOINT_URL="http://127.0.0.1:${p[6]}"
    for _ in $(seq 120); do
        "$BIN/put_rate" s3://volumed/probe 1 64 1 >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    echo "SeaweedFS did not come up; see $WORK/weed.log" >&2
    return 1
}

# Starts volumed on data dir $1 with store URL $2 (extra flags after);
# sets VPID and VOL (the vol command for it). VOLUMED_BIN picks another
# binary than this build's (A/B scripts).
start_volumed() {
    local dir=$1 url=$2; shift 2
    local port; port=$(free_port)
    VOLUMED_STORE=$url "${VOLUMED_BIN:-$BIN/volumed}" --data-dir "$dir" --nbd-listen "127.0.0.1:$port" "$@" 2>>"$dir.log" &
    VPID=$!; PIDS+=($VPID)
    for _ in $(seq 100); do [ -S "$dir/volumed.sock" ] && break; sleep 0.1; done
    VOL="$BIN/vol --socket $dir/volumed.sock"
}

# Writes a raw image of $2 MiB at $1, the same layout every time: per MiB,
# 30 % random data, 10 % written zeros, the rest holes (the image and
# export benchmarks' disk).
make_image() {
    /usr/bin/python3 - "$1" "$2" <<'PY'
import os, random, sys
path, mib = sys.argv[1], int(sys.argv[2])
r = random.Random(7)
with open(path, "wb") as f:
    f.truncate(mib << 20)
    for i in range(mib):
        x = r.random()
        if x < 0.3:
            f.seek(i << 20); f.write(os.urandom(1 << 20))
        elif x < 0.4:
            f.seek(i << 20); f.write(bytes(1 << 20))
PY
}

# Seconds a job took by its own account: the `elapsed_ms` of the last log
# line matching $2 in volumed's log $1 (the snapshot and hydration jobs log
# it when they end). `--wait` polls every 250 ms, too coarse for a step of
# a second. The line follows the state `--wait` saw by a moment.
job_seconds() {
    local ms=""
    for _ in $(seq 100); do
        ms=$(grep "$2" "$1" | tail -1 | sed -n 's/.*elapsed_ms=\([0-9]*\).*/\1/p')
        [ -n "$ms" ] && break
        sleep 0.02
    done
    [ -n "$ms" ] || { echo "no \"$2\" line in $1" >&2; return 1; }
    awk -v ms="$ms" 'BEGIN { printf "%.3f", ms / 1000 }'
}

# User+system CPU seconds of process $1 so far; cpu_us: the same in whole
# microseconds, for per-I/O figures in shell arithmetic.
cpu_secs() { awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15) / hz}' "/proc/$1/stat"; }
cpu_us() { awk -v hz="$(getconf CLK_TCK)" '{printf "%.0f", ($14 + $15) * 1e6 / hz}' "/proc/$1/stat"; }

# Writes a raw image of $2 MiB at $1 in 512 KiB pieces, random and text in
# turn: zstd has work, and the raw path is taken too (the encryption and
# hydration benchmarks' disk).
make_mixed_image() {
    /usr/bin/python3 - "$1" "$2" <<'PY'
import os, sys
path, mib = sys.argv[1], int(sys.argv[2])
text = (b"volumed block storage " * 24000)[: 512 << 10]
with open(path, "wb") as f:
    for i in range(mib * 2):
        f.write(os.urandom(512 << 10) if i % 2 == 0 else text)
PY
}
