//! The per-request work of the NBD wire format: parse a request header,
//! check its range, encode the reply header. Runs once per I/O, so it must
//! stay in the nanoseconds.

use criterion::{Criterion, black_box, criterion_group, criterion_main};
use volumed::nbd::proto::{self, REQUEST_HEADER_LEN, Request};

fn request_bytes() -> [u8; REQUEST_HEADER_LEN] {
    let mut b = [0u8; REQUEST_HEADER_LEN];
    b[..4].copy_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
    b[6..8].copy_from_slice(&1u16.to_be_bytes());
    b[8..16].copy_from_slice(&42u64.to_be_bytes());
    b[16..24].copy_from_slice(&(1u64 << 30).to_be_bytes());
    b[24..].copy_from_slice(&4096u32.to_be_bytes());
    b
}

fn bench(c: &mut Criterion) {
    let raw = request_bytes();
    c.bench_function("nbd/request_parse_check_reply", |b| {
        b.iter(|| {
            let req = Request::parse(black_box(&raw)).expect("valid header");
            let ok = proto::check_range(req.offset, req.length, 64 << 30).is_ok();
            black_box(proto::encode_simple_reply(req.cookie, u32::from(!ok)))
        })
    });
    let mut info = 4u32.to_be_bytes().to_vec();
    info.extend_from_slice(b"data");
    info.extend_from_slice(&1u16.to_be_bytes());
    info.extend_from_slice(&proto::INFO_BLOCK_SIZE.to_be_bytes());
    c.bench_function("nbd/parse_info_request", |b| {
        b.iter(|| proto::parse_info_request(black_box(&info)))
    });
    c.bench_function("api/parse_size", |b| {
        b.iter(|| volumed_api::parse_size(black_box("512GiB")))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
