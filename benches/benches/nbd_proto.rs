//! The per-request work of the NBD wire format: parse a request header,
//! check its range, encode the reply header. Runs once per I/O, so it must
//! stay in the nanoseconds.

use criterion::{Criterion, black_box, criterion_group, criterion_main};
use nbd_proto::{
    Command, INFO_BLOCK_SIZE, InfoRequest, REQUEST_HEADER_LEN, Request, check_range,
    encode_simple_reply, parse_info_request,
};

fn request_bytes() -> [u8; REQUEST_HEADER_LEN] {
    Request {
        flags: 0,
        command: Command::Write,
        cookie: 42,
        offset: 1 << 30,
        length: 4096,
    }
    .encode()
}

fn bench(c: &mut Criterion) {
    let raw = request_bytes();
    c.bench_function("nbd/request_parse_check_reply", |b| {
        b.iter(|| {
            let req = Request::parse(black_box(&raw)).expect("valid header");
            let ok = check_range(req.offset, req.length, 64 << 30).is_ok();
            black_box(encode_simple_reply(req.cookie, u32::from(!ok)))
        })
    });
    let info = InfoRequest {
        name: "data".into(),
        requests: vec![INFO_BLOCK_SIZE],
    }
    .encode()
    .expect("a short name");
    c.bench_function("nbd/parse_info_request", |b| {
        b.iter(|| parse_info_request(black_box(&info)))
    });
    c.bench_function("api/parse_size", |b| {
        b.iter(|| volumed_api::parse_size(black_box("512GiB")))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
