//! The decoder against the encoder: round trips of every reply, the
//! reference the encoder must match byte for byte (the server's writers
//! from before the codec), and the decoder on arbitrary bytes.

use proptest::prelude::*;

use crate::alloc_probe::largest_allocation;
use crate::decode::*;
use crate::*;

fn read(offset: u64, pieces: Vec<Piece>, df: bool) -> Reply {
    Reply {
        cookie: 7,
        body: ReplyBody::Read { offset, pieces, df },
    }
}

fn bytes(r: &Reply, structured: bool) -> Vec<u8> {
    r.encode(structured).unwrap().to_vec()
}

fn arb_pieces() -> impl Strategy<Value = Vec<Piece>> {
    let piece = prop_oneof![
        proptest::collection::vec(any::<u8>(), 1..300).prop_map(Piece::Data),
        (1u64..200_000).prop_map(Piece::Zero),
    ];
    proptest::collection::vec(piece, 1..6)
}

fn content(pieces: &[Piece]) -> Vec<u8> {
    let mut v = Vec::new();
    for p in pieces {
        match p {
            Piece::Data(d) => v.extend_from_slice(d),
            Piece::Zero(n) => v.resize(v.len() + *n as usize, 0),
        }
    }
    v
}

/// How session.rs wrote replies before this codec, made synchronous:
/// the reference the encoder must match byte for byte.
fn legacy(cookie: u64, body: &ReplyBody, structured: bool) -> Vec<u8> {
    let mut w = Vec::new();
    let all = |w: &mut Vec<u8>, pieces: &[Piece]| {
        for p in pieces {
            match p {
                Piece::Data(d) => w.extend_from_slice(d),
                Piece::Zero(n) => w.resize(w.len() + *n as usize, 0),
            }
        }
    };
    let simple = |w: &mut Vec<u8>, e| w.extend_from_slice(&encode_simple_reply(cookie, e));
    let hdr =
        |w: &mut Vec<u8>, f, t, l| w.extend_from_slice(&encode_structured_header(f, t, cookie, l));
    match (body, structured) {
        (ReplyBody::Done, _) => simple(&mut w, 0),
        (ReplyBody::Error { errno, .. }, false) => simple(&mut w, *errno),
        (ReplyBody::Read { pieces, .. }, false) => {
            simple(&mut w, 0);
            all(&mut w, pieces);
        }
        (ReplyBody::BlockStatus { .. }, false) => simple(&mut w, EINVAL),
        (ReplyBody::Error { errno, message }, true) => {
            let p = error_payload(*errno, message);
            hdr(&mut w, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, p.len() as u32);
            w.extend_from_slice(&p);
        }
        (ReplyBody::Read { offset, pieces, df }, true) if *df && pieces.len() > 1 => {
            let total: u64 = pieces.iter().map(Piece::len).sum();
            hdr(
                &mut w,
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                8 + total as u32,
            );
            w.extend_from_slice(&offset.to_be_bytes());
            all(&mut w, pieces);
        }
        (ReplyBody::Read { offset, pieces, .. }, true) => {
            let mut pos = *offset;
            for (i, p) in pieces.iter().enumerate() {
                let flags = if i + 1 == pieces.len() {
                    REPLY_FLAG_DONE
                } else {
                    0
                };
                match p {
                    Piece::Data(d) => {
                        hdr(&mut w, flags, REPLY_TYPE_OFFSET_DATA, 8 + d.len() as u32);
                        w.extend_from_slice(&pos.to_be_bytes());
                        w.extend_from_slice(d);
                    }
                    Piece::Zero(n) => {
                        hdr(&mut w, flags, REPLY_TYPE_OFFSET_HOLE, 12);
                        w.extend_from_slice(&pos.to_be_bytes());
                        w.extend_from_slice(&(*n as u32).to_be_bytes());
                    }
                }
                pos += p.len();
            }
        }
        (ReplyBody::BlockStatus { contexts }, true) => {
            for (i, (context, extents)) in contexts.iter().enumerate() {
                let mut p = context.to_be_bytes().to_vec();
                for e in extents {
                    p.extend_from_slice(&(e.len as u32).to_be_bytes());
                    p.extend_from_slice(&e.flags.to_be_bytes());
                }
                let done = if i + 1 == contexts.len() {
                    REPLY_FLAG_DONE
                } else {
                    0
                };
                hdr(&mut w, done, REPLY_TYPE_BLOCK_STATUS, p.len() as u32);
                w.extend_from_slice(&p);
            }
        }
    }
    w
}

fn arb_body() -> impl Strategy<Value = ReplyBody> {
    let piece = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..100).prop_map(Piece::Data),
        (0u64..70_000).prop_map(Piece::Zero),
    ];
    prop_oneof![
        Just(ReplyBody::Done),
        (any::<u32>(), ".{0,20}").prop_map(|(errno, message)| ReplyBody::Error { errno, message }),
        (
            0u64..1 << 50,
            proptest::collection::vec(piece, 1..5),
            any::<bool>()
        )
            .prop_map(|(offset, pieces, df)| ReplyBody::Read { offset, pieces, df }),
        proptest::collection::vec(
            (
                any::<u32>(),
                proptest::collection::vec((any::<u32>(), any::<u32>()), 0..10)
            ),
            1..4
        )
        .prop_map(|contexts| ReplyBody::BlockStatus {
            contexts: contexts
                .into_iter()
                .map(|(context, e)| (
                    context,
                    e.into_iter()
                        .map(|(len, flags)| BlockExtent {
                            len: len.into(),
                            flags
                        })
                        .collect()
                ))
                .collect(),
        }),
    ]
}

proptest! {
    #[test]
    fn encoding_is_byte_identical_to_the_old_writers(
        cookie in any::<u64>(), body in arb_body(), structured in any::<bool>(),
    ) {
        let r = Reply { cookie, body };
        prop_assert_eq!(bytes(&r, structured), legacy(cookie, &r.body, structured));
    }

    #[test]
    fn reads_round_trip(
        offset in prop_oneof![0u64..1 << 40, Just(u64::MAX - 2_000_000)],
        pieces in arb_pieces(),
        df in any::<bool>(),
        cookie in any::<u64>(),
    ) {
        let want = content(&pieces);
        let mut r = read(offset, pieces, df);
        r.cookie = cookie;
        let units = structured(&bytes(&r, true)).unwrap();
        let Some(Meaning::Read { data, chunks }) = meaning(&units, offset, want.len()) else {
            panic!("not a read reply: {units:?}");
        };
        prop_assert_eq!(&data, &want);
        let ReplyBody::Read { pieces, .. } = &r.body else { unreachable!() };
        if df {
            prop_assert_eq!(chunks, 1);
        } else {
            prop_assert_eq!(chunks, pieces.len());
            // Each chunk's length is its piece's.
            for (u, p) in units.iter().zip(pieces) {
                let Wire::Chunk { typ, payload, .. } = u else { unreachable!() };
                let len = match *typ {
                    REPLY_TYPE_OFFSET_DATA => payload.len() as u64 - 8,
                    _ => u64::from(be_u32(&payload[8..12])),
                };
                prop_assert_eq!(len, p.len());
            }
        }
        let (errno, c, data) = simple(&bytes(&r, false), want.len()).unwrap();
        prop_assert_eq!((errno, c), (0, cookie));
        prop_assert_eq!(data, want);
    }

    #[test]
    fn errors_round_trip(cookie in any::<u64>(), errno in any::<u32>(), msg in ".{0,40}", long in any::<bool>()) {
        let msg = if long { msg.repeat(200) } else { msg };
        let r = Reply::error(cookie, errno, msg.clone());
        let units = structured(&bytes(&r, true)).unwrap();
        let cut = &msg.as_bytes()[..msg.len().min(MAX_STRING)];
        prop_assert_eq!(
            meaning(&units, 0, 0),
            Some(Meaning::Error { errno, message: cut.to_vec() })
        );
        prop_assert_eq!(simple(&bytes(&r, false), 0), Some((errno, cookie, vec![])));
    }

    #[test]
    fn block_status_round_trips(
        contexts in proptest::collection::vec(
            (any::<u32>(), proptest::collection::vec((any::<u32>(), any::<u32>()), 0..50)),
            1..4,
        ),
    ) {
        let r = Reply {
            cookie: 5,
            body: ReplyBody::BlockStatus {
                contexts: contexts
                    .iter()
                    .map(|(c, e)| (*c, e.iter().map(|&(len, flags)| BlockExtent { len: len.into(), flags }).collect()))
                    .collect(),
            },
        };
        let units = structured(&bytes(&r, true)).unwrap();
        prop_assert_eq!(units.len(), contexts.len());
        prop_assert_eq!(meaning(&units, 0, 0), Some(Meaning::BlockStatus { contexts }));
    }

}

/// Moved from the image client with the parsing: chunks land in place,
/// nothing outside the request is written, errors carry errno and message.
#[test]
fn read_chunks_land_in_place() {
    let apply = |typ, p: &[u8], offset, buf: &mut [u8]| {
        Chunk::parse(typ, p).and_then(|c| c.apply_read(offset, buf))
    };
    let mut buf = vec![9u8; 16];
    let mut data = 104u64.to_be_bytes().to_vec();
    data.extend([1, 2, 3, 4]);
    apply(REPLY_TYPE_OFFSET_DATA, &data, 100, &mut buf).unwrap();
    assert_eq!(&buf[4..8], &[1, 2, 3, 4]);
    let mut hole = 100u64.to_be_bytes().to_vec();
    hole.extend(4u32.to_be_bytes());
    apply(REPLY_TYPE_OFFSET_HOLE, &hole, 100, &mut buf).unwrap();
    assert_eq!(&buf[..4], &[0; 4]);
    let mut beyond = 113u64.to_be_bytes().to_vec();
    beyond.extend([1, 2, 3, 4]);
    assert!(apply(REPLY_TYPE_OFFSET_DATA, &beyond, 100, &mut buf).is_err());
    let mut err = 5u32.to_be_bytes().to_vec();
    err.extend(2u16.to_be_bytes());
    err.extend(b"no");
    assert_eq!(
        Chunk::parse(REPLY_TYPE_ERROR, &err),
        Ok(Chunk::Error {
            errno: 5,
            message: b"no"
        })
    );
    assert!(apply(REPLY_TYPE_ERROR, &err, 100, &mut buf).is_err());
    // An error type we do not know still says its errno; the offset of
    // ERROR_OFFSET follows the message.
    err.extend(100u64.to_be_bytes());
    assert!(matches!(
        Chunk::parse(REPLY_TYPE_ERROR_OFFSET, &err),
        Ok(Chunk::Error { errno: 5, .. })
    ));
    assert!(Chunk::parse(REPLY_TYPE_ERROR, &err).is_err());
    assert_eq!(Chunk::parse(REPLY_TYPE_NONE, &[]), Ok(Chunk::None));
    assert!(Chunk::parse(REPLY_TYPE_NONE, &[0]).is_err());
}

#[test]
fn block_status_extents() {
    let mut p = 1u32.to_be_bytes().to_vec();
    p.extend(4096u32.to_be_bytes());
    p.extend(3u32.to_be_bytes());
    p.extend(512u32.to_be_bytes());
    p.extend(0u32.to_be_bytes());
    let Ok(Chunk::BlockStatus { context, extents }) = Chunk::parse(REPLY_TYPE_BLOCK_STATUS, &p)
    else {
        panic!("not block status");
    };
    assert_eq!(context, 1);
    assert_eq!(
        extents.iter().collect::<Vec<_>>(),
        vec![
            BlockExtent {
                len: 4096,
                flags: 3
            },
            BlockExtent { len: 512, flags: 0 }
        ]
    );
    assert!(Chunk::parse(REPLY_TYPE_BLOCK_STATUS, &p[..7]).is_err());
}

#[test]
fn headers_and_their_limits() {
    let h = encode_structured_header(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 9, 4104);
    let c = ChunkHeader::parse(&h).unwrap();
    assert!(c.done());
    assert_eq!(c.payload_len(max_read_chunk(4096)), Ok(4104));
    assert!(c.payload_len(max_read_chunk(4095)).is_err());
    assert!(SimpleReplyHeader::parse(&h[..16].try_into().unwrap()).is_err());
    let s = encode_simple_reply(9, EIO);
    assert_eq!(
        SimpleReplyHeader::parse(&s),
        Ok(SimpleReplyHeader {
            errno: EIO,
            cookie: 9
        })
    );
    assert!(ChunkHeader::parse(&[0; 20]).is_err());
    assert_eq!(header_rest([0x67, 0x44, 0x66, 0x98]), Ok(12));
    assert_eq!(header_rest([0x66, 0x8e, 0x33, 0xef]), Ok(16));
    assert!(header_rest([0; 4]).is_err());
}

proptest! {
    #[test]
    fn chunk_headers_round_trip(flags in any::<u16>(), typ in any::<u16>(), cookie in any::<u64>(), len in any::<u32>()) {
        let c = ChunkHeader::parse(&encode_structured_header(flags, typ, cookie, len)).unwrap();
        prop_assert_eq!(c, ChunkHeader { flags, typ, cookie, len });
    }

    #[test]
    fn simple_headers_round_trip(errno in any::<u32>(), cookie in any::<u64>()) {
        let s = SimpleReplyHeader::parse(&encode_simple_reply(cookie, errno)).unwrap();
        prop_assert_eq!(s, SimpleReplyHeader { errno, cookie });
    }

    #[test]
    fn headers_never_panic(h in proptest::collection::vec(any::<u8>(), 0..24), m in any::<[u8; 4]>()) {
        let (_, max) = largest_allocation(|| {
            let _ = header(&h);
            let _ = header_rest(m);
        });
        prop_assert_eq!(max, 0);
    }

    /// Any payload of any type: no panic, no allocation, and what parses
    /// as a read chunk is put only inside the buffer.
    #[test]
    fn chunks_never_panic(
        typ in prop_oneof![0u16..8, Just(REPLY_TYPE_ERROR), Just(REPLY_TYPE_ERROR_OFFSET), any::<u16>()],
        payload in proptest::collection::vec(any::<u8>(), 0..64),
        offset in any::<u64>(),
        len in 0usize..64,
    ) {
        let mut buf = vec![0u8; len];
        let (_, max) = largest_allocation(|| {
            if let Ok(c) = Chunk::parse(typ, &payload) {
                let _ = c.apply_read(offset, &mut buf);
                if let Chunk::BlockStatus { extents, .. } = c {
                    prop_assert_eq!(extents.iter().count(), extents.len());
                }
            }
            Ok(())
        });
        prop_assert_eq!(max, 0);
    }

    #[test]
    fn data_chunks_at_u64_edges(at in (u64::MAX - 64)..=u64::MAX, n in 0usize..16) {
        let mut buf = vec![0u8; 8];
        let mut p = at.to_be_bytes().to_vec();
        p.extend(vec![1u8; n]);
        let r = Chunk::parse(REPLY_TYPE_OFFSET_DATA, &p).unwrap().apply_read(u64::MAX - 8, &mut buf);
        let fits = at.checked_sub(u64::MAX - 8).is_some_and(|rel| rel + n as u64 <= 8);
        prop_assert_eq!(r.is_ok(), fits);
    }

    /// The stream splitters on arbitrary bytes allocate no more than the
    /// bytes they were given, a list of units (each at least a 16-byte
    /// header), and a read of the length the caller bounded.
    #[test]
    fn splitters_never_panic(b in proptest::collection::vec(any::<u8>(), 0..200), len in 0usize..64) {
        let most_units = (b.len() / SIMPLE_REPLY_HEADER_LEN).max(2) * 2;
        let (units, max) = largest_allocation(|| structured(&b));
        prop_assert!(max <= b.len().max(most_units * size_of::<Wire>()), "{}", max);
        let _ = simple(&b, len);
        if let Some(units) = units {
            let per_unit = size_of::<Chunk>().max(size_of::<(u32, Vec<(u32, u32)>)>());
            let (_, max) = largest_allocation(|| meaning(&units, 0, len));
            prop_assert!(max <= (2 * len).max(b.len()).max(units.len() * per_unit), "{}", max);
        }
    }
}
