//! The reply decoder: the inverse of [`Reply::encode`](crate::Reply::encode),
//! strict about every length so an encoding bug (ours or a server's) shows
//! up as a failed parse.
//!
//! Two levels. A client reads a reply header ([`header_rest`], [`header`]
//! or [`ChunkHeader::parse`]), bounds the payload length before it reads
//! the payload, and gives the payload meaning with [`Chunk::parse`] (which
//! borrows, never copies) and [`Chunk::apply_read`]. Tests and tools that
//! hold a whole reply stream split it with [`structured`] or [`simple`] and
//! interpret one reply with [`meaning`]. The round-trip properties against
//! the encoder are in `decode_tests.rs`.

use crate::{
    BlockExtent, ProtoError, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, REPLY_TYPE_ERROR,
    REPLY_TYPE_ERROR_BIT, REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE,
    SIMPLE_REPLY_HEADER_LEN, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_HEADER_LEN,
    STRUCTURED_REPLY_MAGIC, be_u16, be_u32, be_u64,
};

/// A simple reply's header; a successful READ's data follows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReplyHeader {
    pub errno: u32,
    pub cookie: u64,
}

impl SimpleReplyHeader {
    pub fn parse(b: &[u8; SIMPLE_REPLY_HEADER_LEN]) -> Result<Self, ProtoError> {
        let magic = be_u32(&b[..4]);
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(ProtoError::ReplyMagic(magic));
        }
        Ok(SimpleReplyHeader {
            errno: be_u32(&b[4..8]),
            cookie: be_u64(&b[8..]),
        })
    }
}

/// A structured reply chunk's header; `len` bytes of payload follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub typ: u16,
    pub cookie: u64,
    pub len: u32,
}

impl ChunkHeader {
    pub fn parse(b: &[u8; STRUCTURED_REPLY_HEADER_LEN]) -> Result<Self, ProtoError> {
        let magic = be_u32(&b[..4]);
        if magic != STRUCTURED_REPLY_MAGIC {
            return Err(ProtoError::ReplyMagic(magic));
        }
        Ok(ChunkHeader {
            flags: be_u16(&b[4..6]),
            typ: be_u16(&b[6..8]),
            cookie: be_u64(&b[8..16]),
            len: be_u32(&b[16..20]),
        })
    }

    /// The last chunk of its reply.
    pub fn done(&self) -> bool {
        self.flags & REPLY_FLAG_DONE != 0
    }

    /// The payload length to read, once checked against `max`: a client
    /// bounds what a server can make it allocate.
    pub fn payload_len(&self, max: u32) -> Result<usize, ProtoError> {
        if self.len > max {
            return Err(ProtoError::TooLong {
                what: "reply chunk",
                len: u64::from(self.len),
                max: u64::from(max),
            });
        }
        Ok(self.len as usize)
    }
}

/// A structured reply chunk's payload, by its type. Borrows the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk<'a> {
    None,
    OffsetData {
        offset: u64,
        data: &'a [u8],
    },
    OffsetHole {
        offset: u64,
        len: u32,
    },
    BlockStatus {
        context: u32,
        extents: Extents<'a>,
    },
    /// Any error type: every one starts with the errno and the message;
    /// NBD_REPLY_TYPE_ERROR has nothing more.
    Error {
        errno: u32,
        message: &'a [u8],
    },
    /// A type this crate does not know (not an error type).
    Unknown {
        typ: u16,
        payload: &'a [u8],
    },
}

impl<'a> Chunk<'a> {
    pub fn parse(typ: u16, p: &'a [u8]) -> Result<Self, ProtoError> {
        let bad = |what| ProtoError::Length { what, len: p.len() };
        Ok(match typ {
            REPLY_TYPE_NONE if p.is_empty() => Chunk::None,
            REPLY_TYPE_NONE => return Err(bad("NBD_REPLY_TYPE_NONE")),
            REPLY_TYPE_OFFSET_DATA if p.len() >= 8 => Chunk::OffsetData {
                offset: be_u64(&p[..8]),
                data: &p[8..],
            },
            REPLY_TYPE_OFFSET_DATA => return Err(bad("NBD_REPLY_TYPE_OFFSET_DATA")),
            REPLY_TYPE_OFFSET_HOLE if p.len() == 12 => Chunk::OffsetHole {
                offset: be_u64(&p[..8]),
                len: be_u32(&p[8..]),
            },
            REPLY_TYPE_OFFSET_HOLE => return Err(bad("NBD_REPLY_TYPE_OFFSET_HOLE")),
            REPLY_TYPE_BLOCK_STATUS if p.len() >= 4 && (p.len() - 4).is_multiple_of(8) => {
                Chunk::BlockStatus {
                    context: be_u32(&p[..4]),
                    extents: Extents(&p[4..]),
                }
            }
            REPLY_TYPE_BLOCK_STATUS => return Err(bad("NBD_REPLY_TYPE_BLOCK_STATUS")),
            t if t & REPLY_TYPE_ERROR_BIT != 0 => {
                let n = p.get(4..6).map(|b| usize::from(be_u16(b)));
                match n {
                    Some(n) if p.len() == 6 + n || (t != REPLY_TYPE_ERROR && p.len() > 6 + n) => {
                        Chunk::Error {
                            errno: be_u32(&p[..4]),
                            message: &p[6..6 + n],
                        }
                    }
                    _ => return Err(bad("error chunk")),
                }
            }
            typ => Chunk::Unknown { typ, payload: p },
        })
    }

    /// Puts an OFFSET_DATA or OFFSET_HOLE chunk in place in `buf`, the
    /// answer to a READ of `[offset, offset + buf.len())`; NONE puts
    /// nothing. A chunk reaching outside the request, and any other kind
    /// of chunk (errors included: the caller looks at those first), is
    /// refused.
    pub fn apply_read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ProtoError> {
        let place = |at: u64, len: u64| -> Result<usize, ProtoError> {
            let outside = ProtoError::OutsideRequest { offset: at, len };
            let rel = at.checked_sub(offset).ok_or(outside.clone())?;
            let end = rel.checked_add(len).ok_or(outside.clone())?;
            if end > buf.len() as u64 {
                return Err(outside);
            }
            // Within buf, so within usize.
            Ok(rel as usize)
        };
        match *self {
            Chunk::None => Ok(()),
            Chunk::OffsetData { offset: at, data } => {
                let rel = place(at, data.len() as u64)?;
                buf[rel..rel + data.len()].copy_from_slice(data);
                Ok(())
            }
            Chunk::OffsetHole { offset: at, len } => {
                let rel = place(at, u64::from(len))?;
                buf[rel..rel + len as usize].fill(0);
                Ok(())
            }
            Chunk::BlockStatus { .. } => Err(ProtoError::UnexpectedChunk(REPLY_TYPE_BLOCK_STATUS)),
            Chunk::Error { .. } => Err(ProtoError::UnexpectedChunk(REPLY_TYPE_ERROR)),
            Chunk::Unknown { typ, .. } => Err(ProtoError::UnexpectedChunk(typ)),
        }
    }
}

/// The extents of a BLOCK_STATUS chunk, read in place: (length, flags)
/// pairs of u32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extents<'a>(&'a [u8]);

impl<'a> Extents<'a> {
    pub fn len(&self) -> usize {
        self.0.len() / 8
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = BlockExtent> + 'a {
        self.0.chunks_exact(8).map(|e| BlockExtent {
            len: u64::from(be_u32(&e[..4])),
            flags: be_u32(&e[4..]),
        })
    }
}

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

/// Bytes of the header still to read after its 4-byte magic, which says
/// whether the reply is simple or structured.
pub fn header_rest(magic: [u8; 4]) -> Result<usize, ProtoError> {
    match u32::from_be_bytes(magic) {
        SIMPLE_REPLY_MAGIC => Ok(SIMPLE_REPLY_HEADER_LEN - 4),
        STRUCTURED_REPLY_MAGIC => Ok(STRUCTURED_REPLY_HEADER_LEN - 4),
        other => Err(ProtoError::ReplyMagic(other)),
    }
}

/// Parses a whole header, simple or structured; for a chunk, also the
/// payload length to read (unbounded: see [`ChunkHeader::payload_len`]).
pub fn header(h: &[u8]) -> Result<(Wire, usize), ProtoError> {
    if let Ok(b) = h.try_into() {
        let s = SimpleReplyHeader::parse(b)?;
        return Ok((
            Wire::Simple {
                errno: s.errno,
                cookie: s.cookie,
            },
            0,
        ));
    }
    if let Ok(b) = h.try_into() {
        let c = ChunkHeader::parse(b)?;
        return Ok((
            Wire::Chunk {
                flags: c.flags,
                typ: c.typ,
                cookie: c.cookie,
                payload: Vec::new(),
            },
            c.len as usize,
        ));
    }
    Err(ProtoError::Length {
        what: "reply header",
        len: h.len(),
    })
}

/// Splits a structured-mode stream into units; None if anything is
/// truncated or has a bad magic.
pub fn structured(mut b: &[u8]) -> Option<Vec<Wire>> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let rest = header_rest(b.get(..4)?.try_into().ok()?).ok()?;
        let (mut w, len) = header(b.get(..4 + rest)?).ok()?;
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
    let h = SimpleReplyHeader::parse(b.get(..SIMPLE_REPLY_HEADER_LEN)?.try_into().ok()?).ok()?;
    let data = &b[SIMPLE_REPLY_HEADER_LEN..];
    let data_len = if h.errno == 0 { data_len } else { 0 };
    (data.len() == data_len).then(|| (h.errno, h.cookie, data.to_vec()))
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
/// last one done). A read's chunks must tile `[offset, offset + len)`;
/// `len` is the caller's bound on what this allocates.
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
    let chunks = units
        .iter()
        .map(|u| match u {
            Wire::Chunk { typ, payload, .. } => Chunk::parse(*typ, payload).ok(),
            Wire::Simple { .. } => None,
        })
        .collect::<Option<Vec<_>>>()?;
    if let [Chunk::Error { errno, message }] = chunks[..]
        && let [Wire::Chunk { typ, .. }] = units
        && *typ == REPLY_TYPE_ERROR
    {
        return Some(Meaning::Error {
            errno,
            message: message.to_vec(),
        });
    }
    if chunks
        .iter()
        .all(|c| matches!(c, Chunk::BlockStatus { .. }))
    {
        let contexts = chunks
            .iter()
            .filter_map(|c| match c {
                Chunk::BlockStatus { context, extents } => Some((
                    *context,
                    extents.iter().map(|e| (e.len as u32, e.flags)).collect(),
                )),
                _ => None,
            })
            .collect();
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
    for c in &chunks {
        match *c {
            Chunk::OffsetData { offset: at, data } => put(at, &mut data.iter().copied())?,
            Chunk::OffsetHole { offset: at, len } => {
                put(at, &mut std::iter::repeat_n(0, len as usize))?
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
