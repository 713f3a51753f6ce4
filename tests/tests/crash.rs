//! Invariant 1 under kill -9: every write acknowledged before a FLUSH (or
//! with FUA) survives; unflushed writes may be lost, nothing else changes.
//!
//! Each block written carries its own index and the round that wrote it, so
//! after a crash any block is either all zeros or a valid block of its own
//! index: a torn, misplaced or foreign block fails the check.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use volumed_tests::{TestDaemon, run_ok};

const BS: usize = 4096;
const BLOCKS: u32 = 16384; // 64 MiB
const FLUSHED_REGION: u32 = BLOCKS / 2;

/// The block that round `round` writes at index `idx`.
fn block(idx: u32, round: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(BS);
    b.extend_from_slice(b"VOLB");
    b.extend_from_slice(&idx.to_le_bytes());
    b.extend_from_slice(&round.to_le_bytes());
    b.extend_from_slice(&[0; 4]);
    let fill = ((idx as u64 * 31 + round as u64 * 7) % 251 + 1) as u8;
    b.resize(BS, fill);
    b
}

/// `None` for a zero block, the writing round for a valid one; panics on
/// anything else.
fn decode(idx: u32, b: &[u8]) -> Option<u32> {
    if b.iter().all(|x| *x == 0) {
        return None;
    }
    let round = u32::from_le_bytes(b[8..12].try_into().unwrap());
    assert!(
        b == block(idx, round).as_slice(),
        "block {idx} is neither zero nor a block written for it"
    );
    Some(round)
}

/// The writer: flushed writes (some FUA) to the first half, then, after
/// saying so, unflushed writes with many in flight to the second half until
/// the daemon dies under it.
const WRITER: &str = r#"
import struct, random
BS = 4096
def block(idx, rnd):
    fill = (idx * 31 + rnd * 7) % 251 + 1
    return b'VOLB' + struct.pack('<II', idx, rnd) + b'\0' * 4 + bytes([fill]) * (BS - 16)
rnd = int(sys.argv[1])
flushed = [int(x) for x in sys.argv[2].split(',')]
h = nbd.NBD(); h.connect_uri(URI)
for i, idx in enumerate(flushed):
    h.pwrite(block(idx, rnd), idx * BS, nbd.CMD_FLAG_FUA if i % 4 == 0 else 0)
h.flush()
print('flushed', flush=True)
try:
    while True:
        while h.aio_in_flight() < 32:
            idx = random.randrange(8192, 16384)
            h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(block(idx, rnd))), idx * BS, completion=lambda e: 1)
        h.poll(-1)
except nbd.Error:
    pass
"#;

/// A small deterministic generator, so a failing round can be replayed.
struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn kill9_mid_io_loses_no_flushed_write() {
    let rounds: u32 = std::env::var("CRASH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(20);
    let mut d = TestDaemon::start();
    d.vol_ok(&["create", "crash", "--size", "64M", "--chunk-size", "64K"]);
    d.vol_ok(&["attach", "crash"]);
    let mut model: Vec<Option<u32>> = vec![None; FLUSHED_REGION as usize];
    let mut rng = XorShift(0x5eed_1234_abcd_0001);
    let dump = d.dir.path().join("dump.img");

    for round in 1..=rounds {
        let picks: Vec<u32> = (0..64)
            .map(|_| (rng.next() % u64::from(FLUSHED_REGION)) as u32)
            .collect();
        let list = picks
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let mut writer = Command::new("/usr/bin/python3")
            .arg("-c")
            .arg(format!(
                "import nbd, os, sys\nURI = os.environ['URI']\n{WRITER}"
            ))
            .arg(round.to_string())
            .arg(&list)
            .env("URI", d.uri("crash"))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(writer.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "flushed", "round {round}");
        for idx in &picks {
            model[*idx as usize] = Some(round);
        }
        // Let unflushed writes pile up, then kill in the middle of them.
        std::thread::sleep(Duration::from_millis(rng.next() % 40));
        d.kill9();
        writer.wait().unwrap();
        d.start_again();

        let _ = std::fs::remove_file(&dump);
        run_ok(Command::new("nbdcopy").arg(d.uri("crash")).arg(&dump));
        let bytes = std::fs::read(&dump).unwrap();
        assert_eq!(bytes.len(), BLOCKS as usize * BS);
        for idx in 0..BLOCKS {
            let got = decode(idx, &bytes[idx as usize * BS..(idx as usize + 1) * BS]);
            if idx < FLUSHED_REGION {
                assert_eq!(
                    got, model[idx as usize],
                    "round {round}: flushed block {idx}"
                );
            } else if let Some(r) = got {
                assert!(r <= round, "round {round}: block {idx} from the future");
            }
        }
    }
    assert!(d.log().contains("previous run did not shut down cleanly"));
    d.finish_expecting(&[], &["previous run did not shut down cleanly"]);
}
