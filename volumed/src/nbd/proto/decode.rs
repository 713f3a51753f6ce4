//! A decoder of transmission replies, for tests only: the inverse of
//! [`Reply::encode`](super::Reply::encode), strict about every length so an
//! encoding bug shows up as a failed parse. The session tests read replies
//! off the wire with it. The encoder's round-trip properties live here
//! beside it, and so does the reference it must match byte for byte: the
//! session's writers from before the codec.

use super::*;

/// One reply unit off the wire. In structured mode a simple reply has
/// no data; a simple-mode read's data follows its header (see
/// [`simple`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wire {
    Simple {
        errno: u32,
        cookie: u64,
    },
    Chunk {
        flags: u16,
        typ: u16,
        cookie: u64,
        payload: Vec<u8>,
    },
}

impl Wire {
    pub fn cookie(&self) -> u64 {
        match self {
            Wire::Simple { cookie, .. } | Wire::Chunk { cookie, .. } => *cookie,
        }
    }

    /// Whether this ends its reply.
    pub fn done(&self) -> bool {
        match self {
            Wire::Simple { .. } => true,
            Wire::Chunk { flags, .. } => flags & REPLY_FLAG_DONE != 0,
        }
    }
}

/// Bytes still to read after the 4-byte magic, or None for a bad magic.
pub fn header_rest(magic: [u8; 4]) -> Option<usize> {
    match u32::from_be_bytes(magic) {
        SIMPLE_REPLY_MAGIC => Some(SIMPLE_REPLY_HEADER_LEN - 4),
        STRUCTURED_REPLY_MAGIC => Some(STRUCTURED_REPLY_HEADER_LEN - 4),
        _ => None,
    }
}

/// Parses a whole header; for a chunk, also the payload length to read.
pub fn header(h: &[u8]) -> Option<(Wire, usize)> {
    match (be_u32(h.get(..4)?), h.len()) {
        (SIMPLE_REPLY_MAGIC, SIMPLE_REPLY_HEADER_LEN) => Some((
            Wire::Simple {
                errno: be_u32(&h[4..8]),
                cookie: be_u64(&h[8..16]),
            },
            0,
        )),
        (STRUCTURED_REPLY_MAGIC, STRUCTURED_REPLY_HEADER_LEN) => Some((
            Wire::Chunk {
                flags: be_u16(&h[4..6]),
                typ: be_u16(&h[6..8]),
                cookie: be_u64(&h[8..16]),
                payload: Vec::new(),
            },
            be_u32(&h[16..20]) as usize,
        )),
        _ => None,
    }
}

/// Splits a structured-mode stream into units; None if anything is
/// truncated or has a bad magic.
pub fn structured(mut b: &[u8]) -> Option<Vec<Wire>> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let rest = header_rest(b.get(..4)?.try_into().ok()?)?;
        let (mut w, len) = header(b.get(..4 + rest)?)?;
        b = &b[4 + rest..];
        if let Wire::Chunk { payload, .. } = &mut w {
            *payload = b.get(..len)?.to_vec();
            b = &b[len..];
        }
        out.push(w);
    }
    Some(out)
}

/// A simple reply with `data_len` bytes of read data after it (0 for
/// anything but a successful read): errno, cookie, data.
pub fn simple(b: &[u8], data_len: usize) -> Option<(u32, u64, Vec<u8>)> {
    let (w, _) = header(b.get(..SIMPLE_REPLY_HEADER_LEN)?)?;
    let Wire::Simple { errno, cookie } = w else {
        return None;
    };
    let data = &b[SIMPLE_REPLY_HEADER_LEN..];
    let data_len = if errno == 0 { data_len } else { 0 };
    (data.len() == data_len).then(|| (errno, cookie, data.to_vec()))
}

/// What the chunks of one structured reply say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Meaning {
    Done,
    Error {
        errno: u32,
        message: Vec<u8>,
    },
    /// A read's content at `offset`, holes filled, and how many content
    /// chunks carried it.
    Read {
        data: Vec<u8>,
        chunks: usize,
    },
    /// Each context's id and (length, flags) extents, in chunk order.
    BlockStatus {
        contexts: Vec<(u32, Vec<(u32, u32)>)>,
    },
}

/// Interprets the units of one reply (all with one cookie, only the
/// last one done). A read's chunks must tile `[offset, offset + len)`.
pub fn meaning(units: &[Wire], offset: u64, len: usize) -> Option<Meaning> {
    let (last, init) = units.split_last()?;
    if !last.done() || init.iter().any(Wire::done) {
        return None;
    }
    if units.iter().any(|u| u.cookie() != last.cookie()) {
        return None;
    }
    if let Wire::Simple { errno, .. } = last {
        return (units.len() == 1).then(|| match errno {
            0 => Meaning::Done,
            e => Meaning::Error {
                errno: *e,
                message: Vec::new(),
            },
        });
    }
    if let [Wire::Chunk { typ, payload, .. }] = units
        && *typ == REPLY_TYPE_ERROR
    {
        return error(payload);
    }
    if units
        .iter()
        .all(|u| matches!(u, Wire::Chunk { typ, .. } if *typ == REPLY_TYPE_BLOCK_STATUS))
    {
        let contexts = units
            .iter()
            .map(|u| match u {
                Wire::Chunk { payload, .. } => block_status(payload),
                Wire::Simple { .. } => None,
            })
            .collect::<Option<Vec<_>>>()?;
        return Some(Meaning::BlockStatus { contexts });
    }
    // Only now, once this is a read, is the content allocated.
    let mut data = vec![None::<u8>; len];
    let mut put = |at: u64, bytes: &mut dyn Iterator<Item = u8>| -> Option<()> {
        let start = usize::try_from(at.checked_sub(offset)?).ok()?;
        for (i, b) in (start..).zip(bytes) {
            let slot = data.get_mut(i)?;
            if slot.replace(b).is_some() {
                return None; // two chunks cover one byte
            }
        }
        Some(())
    };
    for u in units {
        let Wire::Chunk { typ, payload, .. } = u else {
            return None;
        };
        let p = payload.as_slice();
        match *typ {
            REPLY_TYPE_OFFSET_DATA => {
                put(be_u64(p.get(..8)?), &mut p[8..].iter().copied())?;
            }
            REPLY_TYPE_OFFSET_HOLE => {
                (p.len() == 12).then_some(())?;
                let n = be_u32(&p[8..12]) as usize;
                put(be_u64(&p[..8]), &mut std::iter::repeat_n(0, n))?;
            }
            _ => return None,
        }
    }
    let data = data.into_iter().collect::<Option<Vec<u8>>>()?;
    Some(Meaning::Read {
        data,
        chunks: units.len(),
    })
}

fn error(p: &[u8]) -> Option<Meaning> {
    let n = usize::from(be_u16(p.get(4..6)?));
    (p.len() == 6 + n).then(|| Meaning::Error {
        errno: be_u32(&p[..4]),
        message: p[6..].to_vec(),
    })
}

fn block_status(p: &[u8]) -> Option<(u32, Vec<(u32, u32)>)> {
    (p.len() >= 4 && (p.len() - 4).is_multiple_of(8)).then(|| {
        (
            be_u32(&p[..4]),
            p[4..]
                .chunks_exact(8)
                .map(|e| (be_u32(&e[..4]), be_u32(&e[4..])))
                .collect(),
        )
    })
}

mod tests {
    use super::*;
    use proptest::prelude::*;

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
        let hdr = |w: &mut Vec<u8>, f, t, l| {
            w.extend_from_slice(&encode_structured_header(f, t, cookie, l))
        };
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
            (any::<u32>(), ".{0,20}")
                .prop_map(|(errno, message)| ReplyBody::Error { errno, message }),
            (
                0u64..1 << 50,
                proptest::collection::vec(piece, 1..5),
                any::<bool>()
            )
                .prop_map(|(offset, pieces, df)| ReplyBody::Read {
                    offset,
                    pieces,
                    df
                }),
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
}
