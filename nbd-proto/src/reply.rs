//! Replies of the transmission phase: a [`Reply`] value and its exact wire
//! bytes, as a simple reply or as structured reply chunks.
//!
//! [`Reply::encode`] is pure and does not copy a read's data: it writes the
//! headers into one small buffer and returns them interleaved with borrowed
//! slices of the data (and of a static zero page for holes), in wire order,
//! ready for `write_all` or `IoSlice`s.
//!
//! | reply                | simple                   | structured                              |
//! |----------------------|--------------------------|-----------------------------------------|
//! | done                 | header, error 0          | the same simple reply (no payload)      |
//! | error                | header, errno            | one ERROR chunk: errno, message         |
//! | read                 | header, data, holes as 0 | OFFSET_DATA / OFFSET_HOLE per piece     |
//! | read with DF         | as read                  | one OFFSET_DATA, holes filled with 0    |
//! | block status         | header, EINVAL           | one BLOCK_STATUS chunk: context, extents|
//!
//! A DF read of a single piece is not merged: a lone hole goes out as one
//! OFFSET_HOLE chunk, which the spec allows since it is still one chunk.

use crate::{
    EINVAL, EncodeError, MAX_STRING, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, REPLY_TYPE_ERROR,
    REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE, SIMPLE_REPLY_HEADER_LEN, SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_HEADER_LEN, STRUCTURED_REPLY_MAGIC,
};

/// Holes are sent from this, in slices of at most its length.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// A read's answer, in order from the request's offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Data(Vec<u8>),
    /// This many bytes of zeros.
    Zero(u64),
}

impl Piece {
    pub fn len(&self) -> u64 {
        match self {
            Piece::Data(d) => d.len() as u64,
            Piece::Zero(n) => *n,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One run of a BLOCK_STATUS answer; what `flags` mean depends on the
/// metadata context (for base:allocation, STATE_HOLE and STATE_ZERO).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockExtent {
    pub len: u64,
    pub flags: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyBody {
    /// Success with no payload.
    Done,
    /// An errno, with a message that only structured replies carry.
    Error { errno: u32, message: String },
    /// A read's data, starting at `offset`; `df` forbids fragmenting it.
    Read {
        offset: u64,
        pieces: Vec<Piece>,
        df: bool,
    },
    /// Extents of each selected metadata context, by the id the client
    /// was given: one chunk per context, the last one done.
    BlockStatus {
        contexts: Vec<(u32, Vec<BlockExtent>)>,
    },
}

/// The answer to the request with this cookie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub cookie: u64,
    pub body: ReplyBody,
}

/// A reply's wire bytes: headers in one owned buffer, data borrowed.
#[derive(Debug, Default)]
pub struct Encoded<'a> {
    head: Vec<u8>,
    parts: Vec<Part<'a>>,
}

#[derive(Debug, Clone, Copy)]
enum Part<'a> {
    /// `head[start..end]`.
    Head(usize, usize),
    Data(&'a [u8]),
    Zeros(u64),
}

impl<'a> Encoded<'a> {
    fn head(&mut self, bytes: &[u8]) {
        let start = self.head.len();
        self.head.extend_from_slice(bytes);
        let end = self.head.len();
        // Consecutive headers stay one slice.
        match self.parts.last_mut() {
            Some(Part::Head(_, e)) if *e == start => *e = end,
            _ => self.parts.push(Part::Head(start, end)),
        }
    }

    fn piece(&mut self, p: &'a Piece) {
        match p {
            Piece::Data(d) if d.is_empty() => {}
            Piece::Data(d) => self.parts.push(Part::Data(d)),
            Piece::Zero(0) => {}
            Piece::Zero(n) => self.parts.push(Part::Zeros(*n)),
        }
    }

    /// The bytes in wire order; none of them is empty.
    pub fn slices(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.parts.iter().flat_map(move |p| match *p {
            Part::Head(s, e) => PartSlices::one(&self.head[s..e]),
            Part::Data(d) => PartSlices::one(d),
            Part::Zeros(n) => PartSlices {
                first: None,
                zeros: n,
            },
        })
    }

    /// All the bytes in one buffer: a copy, for tests and small replies.
    pub fn to_vec(&self) -> Vec<u8> {
        self.slices().flatten().copied().collect()
    }
}

/// The slices of one part: a run of zeros comes out in page-sized slices.
struct PartSlices<'s> {
    first: Option<&'s [u8]>,
    zeros: u64,
}

impl<'s> PartSlices<'s> {
    fn one(s: &'s [u8]) -> Self {
        PartSlices {
            first: Some(s),
            zeros: 0,
        }
    }
}

impl<'s> Iterator for PartSlices<'s> {
    type Item = &'s [u8];
    fn next(&mut self) -> Option<&'s [u8]> {
        if let Some(s) = self.first.take() {
            return Some(s);
        }
        if self.zeros == 0 {
            return None;
        }
        let k = self.zeros.min(ZEROS.len() as u64);
        self.zeros -= k;
        // k is at most ZEROS.len(), so it fits usize.
        Some(&ZEROS[..k as usize])
    }
}

fn fit_u32(what: &'static str, len: u64) -> Result<u32, EncodeError> {
    u32::try_from(len).map_err(|_| EncodeError::TooLong { what, len })
}

impl Reply {
    pub fn done(cookie: u64) -> Self {
        Reply {
            cookie,
            body: ReplyBody::Done,
        }
    }

    pub fn error(cookie: u64, errno: u32, message: impl Into<String>) -> Self {
        Reply {
            cookie,
            body: ReplyBody::Error {
                errno,
                message: message.into(),
            },
        }
    }

    /// The wire bytes of this reply, in the form the session negotiated.
    pub fn encode(&self, structured: bool) -> Result<Encoded<'_>, EncodeError> {
        let mut out = Encoded::default();
        if structured {
            self.encode_structured(&mut out)?;
        } else {
            self.encode_simple(&mut out);
        }
        Ok(out)
    }

    fn encode_simple<'a>(&'a self, out: &mut Encoded<'a>) {
        let errno = match &self.body {
            ReplyBody::Done | ReplyBody::Read { .. } => 0,
            ReplyBody::Error { errno, .. } => *errno,
            // Validation refuses BLOCK_STATUS without structured replies.
            ReplyBody::BlockStatus { .. } => EINVAL,
        };
        out.head(&encode_simple_reply(self.cookie, errno));
        if let ReplyBody::Read { pieces, .. } = &self.body {
            pieces.iter().for_each(|p| out.piece(p));
        }
    }

    fn encode_structured<'a>(&'a self, out: &mut Encoded<'a>) -> Result<(), EncodeError> {
        let cookie = self.cookie;
        let chunk = |flags, typ, len| encode_structured_header(flags, typ, cookie, len);
        match &self.body {
            // A simple reply is allowed for any command without payload.
            ReplyBody::Done => out.head(&encode_simple_reply(cookie, 0)),
            ReplyBody::Error { errno, message } => {
                let p = error_payload(*errno, message);
                // At most 6 + MAX_STRING bytes.
                let len = fit_u32("error message", p.len() as u64)?;
                out.head(&chunk(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, len));
                out.head(&p);
            }
            ReplyBody::Read { pieces, .. } if pieces.is_empty() => {
                return Err(EncodeError::EmptyRead);
            }
            ReplyBody::Read {
                offset,
                pieces,
                df: true,
            } if pieces.len() > 1 => {
                // Don't fragment: one OFFSET_DATA chunk with holes filled in.
                let total = pieces
                    .iter()
                    .try_fold(0u64, |t, p| t.checked_add(p.len()))
                    .ok_or(EncodeError::OffsetOverflow { offset: *offset })?;
                offset
                    .checked_add(total)
                    .ok_or(EncodeError::OffsetOverflow { offset: *offset })?;
                let len = fit_u32("unfragmented read", total.saturating_add(8))?;
                out.head(&chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, len));
                out.head(&offset.to_be_bytes());
                pieces.iter().for_each(|p| out.piece(p));
            }
            ReplyBody::Read { offset, pieces, .. } => {
                let mut pos = *offset;
                for (i, p) in pieces.iter().enumerate() {
                    let flags = if i + 1 == pieces.len() {
                        REPLY_FLAG_DONE
                    } else {
                        0
                    };
                    match p {
                        Piece::Data(d) => {
                            let len = fit_u32("data chunk", (d.len() as u64).saturating_add(8))?;
                            out.head(&chunk(flags, REPLY_TYPE_OFFSET_DATA, len));
                            out.head(&pos.to_be_bytes());
                            out.piece(p);
                        }
                        // A hole is its length, never its bytes.
                        Piece::Zero(n) => {
                            let n = fit_u32("hole", *n)?;
                            out.head(&chunk(flags, REPLY_TYPE_OFFSET_HOLE, 12));
                            out.head(&pos.to_be_bytes());
                            out.head(&n.to_be_bytes());
                        }
                    }
                    pos = pos
                        .checked_add(p.len())
                        .ok_or(EncodeError::OffsetOverflow { offset: *offset })?;
                }
            }
            ReplyBody::BlockStatus { contexts } => {
                if contexts.is_empty() {
                    return Err(EncodeError::EmptyBlockStatus);
                }
                for (i, (context, extents)) in contexts.iter().enumerate() {
                    let n = extents.len() as u64;
                    let len = fit_u32("block status", n.saturating_mul(8).saturating_add(4))?;
                    let flags = if i + 1 == contexts.len() {
                        REPLY_FLAG_DONE
                    } else {
                        0
                    };
                    out.head(&chunk(flags, REPLY_TYPE_BLOCK_STATUS, len));
                    out.head(&context.to_be_bytes());
                    for e in extents {
                        out.head(&fit_u32("extent", e.len)?.to_be_bytes());
                        out.head(&e.flags.to_be_bytes());
                    }
                }
            }
        }
        Ok(())
    }
}

pub fn encode_simple_reply(cookie: u64, error: u32) -> [u8; SIMPLE_REPLY_HEADER_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_HEADER_LEN];
    b[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// A structured reply chunk header.
pub fn encode_structured_header(
    flags: u16,
    typ: u16,
    cookie: u64,
    len: u32,
) -> [u8; STRUCTURED_REPLY_HEADER_LEN] {
    let mut b = [0u8; STRUCTURED_REPLY_HEADER_LEN];
    b[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&typ.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..].copy_from_slice(&len.to_be_bytes());
    b
}

/// NBD_REPLY_TYPE_ERROR payload: errno, message length, message. The
/// message is cut to [`MAX_STRING`] bytes.
pub fn error_payload(errno: u32, msg: &str) -> Vec<u8> {
    let msg = &msg.as_bytes()[..msg.len().min(MAX_STRING)];
    let mut d = Vec::with_capacity(6 + msg.len());
    d.extend_from_slice(&errno.to_be_bytes());
    // MAX_STRING fits u16.
    d.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    d.extend_from_slice(msg);
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{EIO, META_BASE_ALLOCATION_ID, STATE_HOLE, STATE_ZERO, STRUCTURED_REPLY_MAGIC};
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

    /// The bytes session.rs wrote before the codec, spelled out by hand.
    #[test]
    fn exact_wire_bytes() {
        let mut simple_done = vec![0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0];
        simple_done.extend_from_slice(&9u64.to_be_bytes());
        assert_eq!(bytes(&Reply::done(9), false), simple_done);
        assert_eq!(bytes(&Reply::done(9), true), simple_done);

        let mut e = vec![0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22];
        e.extend_from_slice(&9u64.to_be_bytes());
        assert_eq!(bytes(&Reply::error(9, EINVAL, "no"), false), e);

        let mut se = vec![0x66, 0x8e, 0x33, 0xef, 0, 1, 0x80, 1];
        se.extend_from_slice(&9u64.to_be_bytes());
        se.extend_from_slice(&[0, 0, 0, 8, 0, 0, 0, 5, 0, 2, b'n', b'o']);
        assert_eq!(bytes(&Reply::error(9, EIO, "no"), true), se);

        // Data then a hole: two chunks, DONE on the last.
        let r = read(512, vec![Piece::Data(vec![1, 2]), Piece::Zero(3)], false);
        let mut sr = vec![0x66, 0x8e, 0x33, 0xef, 0, 0, 0, 1];
        sr.extend_from_slice(&7u64.to_be_bytes());
        sr.extend_from_slice(&10u32.to_be_bytes());
        sr.extend_from_slice(&512u64.to_be_bytes());
        sr.extend_from_slice(&[1, 2]);
        sr.extend_from_slice(&[0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 2]);
        sr.extend_from_slice(&7u64.to_be_bytes());
        sr.extend_from_slice(&12u32.to_be_bytes());
        sr.extend_from_slice(&514u64.to_be_bytes());
        sr.extend_from_slice(&3u32.to_be_bytes());
        assert_eq!(bytes(&r, true), sr);

        let mut simple_read = encode_simple_reply(7, 0).to_vec();
        simple_read.extend_from_slice(&[1, 2, 0, 0, 0]);
        assert_eq!(bytes(&r, false), simple_read);

        // The same with DF: one chunk, the hole filled.
        let r = read(512, vec![Piece::Data(vec![1, 2]), Piece::Zero(3)], true);
        let mut df = vec![0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 1];
        df.extend_from_slice(&7u64.to_be_bytes());
        df.extend_from_slice(&13u32.to_be_bytes());
        df.extend_from_slice(&512u64.to_be_bytes());
        df.extend_from_slice(&[1, 2, 0, 0, 0]);
        assert_eq!(bytes(&r, true), df);

        let bs = Reply {
            cookie: 3,
            body: ReplyBody::BlockStatus {
                contexts: vec![(
                    META_BASE_ALLOCATION_ID,
                    vec![
                        BlockExtent {
                            len: 4096,
                            flags: 0,
                        },
                        BlockExtent {
                            len: 512,
                            flags: STATE_HOLE | STATE_ZERO,
                        },
                    ],
                )],
            },
        };
        let mut b =
            encode_structured_header(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 3, 20).to_vec();
        b.extend_from_slice(&[
            0, 0, 0, 1, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 3,
        ]);
        assert_eq!(bytes(&bs, true), b);
        assert_eq!(bytes(&bs, false), encode_simple_reply(3, EINVAL));
    }

    #[test]
    fn structured_encodings() {
        let h = encode_structured_header(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 9, 6);
        assert_eq!(&h[..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&h[4..8], &[0, 1, 0x80, 1]);
        assert_eq!(error_payload(EIO, "")[..], [0, 0, 0, 5, 0, 0]);
        assert_eq!(
            error_payload(EIO, &"x".repeat(10_000)).len(),
            6 + MAX_STRING
        );
    }

    #[test]
    fn data_is_borrowed_not_copied() {
        let r = read(0, vec![Piece::Data(vec![5; 1 << 20])], false);
        let enc = r.encode(true).unwrap();
        let ReplyBody::Read { pieces, .. } = &r.body else {
            unreachable!()
        };
        let Piece::Data(d) = &pieces[0] else {
            unreachable!()
        };
        assert!(enc.slices().any(|s| std::ptr::eq(s, d.as_slice())));
    }

    #[test]
    fn unencodable_replies_are_errors() {
        let too_big = read(0, vec![Piece::Zero(1 << 32)], false);
        assert!(matches!(
            too_big.encode(true),
            Err(EncodeError::TooLong { what: "hole", .. })
        ));
        let df = read(
            0,
            vec![Piece::Zero(u64::from(u32::MAX)), Piece::Zero(1)],
            true,
        );
        assert!(matches!(df.encode(true), Err(EncodeError::TooLong { .. })));
        let past = read(u64::MAX, vec![Piece::Zero(1), Piece::Zero(1)], false);
        assert!(matches!(
            past.encode(true),
            Err(EncodeError::OffsetOverflow { .. })
        ));
        assert_eq!(
            read(0, vec![], false).encode(true).err(),
            Some(EncodeError::EmptyRead)
        );
        let extent = Reply {
            cookie: 1,
            body: ReplyBody::BlockStatus {
                contexts: vec![(
                    1,
                    vec![BlockExtent {
                        len: 1 << 32,
                        flags: 0,
                    }],
                )],
            },
        };
        assert!(extent.encode(true).is_err());
        let none = Reply {
            cookie: 1,
            body: ReplyBody::BlockStatus { contexts: vec![] },
        };
        assert_eq!(none.encode(true).err(), Some(EncodeError::EmptyBlockStatus));
    }

    proptest! {
        #[test]
        fn encode_never_panics(
            offset in any::<u64>(),
            lens in proptest::collection::vec((any::<bool>(), any::<u64>()), 0..4),
            df in any::<bool>(),
            structured in any::<bool>(),
        ) {
            // Holes of any length cost nothing to encode; data stays small.
            let pieces = lens
                .into_iter()
                .map(|(data, n)| if data { Piece::Data(vec![0; (n % 64) as usize]) } else { Piece::Zero(n) })
                .collect();
            let r = read(offset, pieces, df);
            if let Ok(enc) = r.encode(structured) {
                // Only the headers are materialized; walk a bounded prefix.
                prop_assert!(enc.slices().take(64).all(|s| !s.is_empty()));
            }
        }
    }
}
