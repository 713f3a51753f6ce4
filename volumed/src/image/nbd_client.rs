//! A small NBD client: the fixed-newstyle handshake with structured replies
//! and `base:allocation`, then READ and BLOCK_STATUS one request at a time.
//! Parallelism comes from several connections (see `source::NbdPool`), which
//! keeps each connection a plain request-answer loop. Reply parsing is pure
//! (the `parse_*` functions) and property-tested; lengths from the server
//! are bounded before anything is allocated for them.

use std::io;
use std::path::Path;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use crate::nbd::proto::{
    FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT,
    INFO_EXPORT, META_BASE_ALLOCATION, NBDMAGIC, OPT_GO, OPT_SET_META_CONTEXT,
    OPT_STRUCTURED_REPLY, OPTION_REPLY_MAGIC, REP_ACK, REP_INFO, REP_META_CONTEXT, REPLY_FLAG_DONE,
    REPLY_TYPE_BLOCK_STATUS, REPLY_TYPE_ERROR, REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA,
    REPLY_TYPE_OFFSET_HOLE, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, STATE_ZERO, STRUCTURED_REPLY_MAGIC,
};

/// Option replies with this bit set are errors.
const REP_ERR: u32 = 1 << 31;
const CMD_READ: u16 = 0;
const CMD_DISC: u16 = 2;
const CMD_BLOCK_STATUS: u16 = 7;

/// Largest option reply or structured chunk accepted: a READ is at most one
/// chunk (4 MiB) and its reply chunks carry 8 bytes more.
const MAX_PAYLOAD: u32 = (4 << 20) + 64;
/// The largest READ this client asks for.
pub const MAX_READ: u32 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("nbd i/o: {0}")]
    Io(#[from] io::Error),
    #[error("nbd protocol: {0}")]
    Protocol(String),
    #[error("nbd server refused option {option}: {message}")]
    Refused { option: u32, message: String },
    #[error("nbd read at offset={offset}: errno={errno} {message}")]
    Command {
        offset: u64,
        errno: u32,
        message: String,
    },
}

fn proto(what: impl Into<String>) -> NbdError {
    NbdError::Protocol(what.into())
}

/// One run of BLOCK_STATUS: `len` bytes that are a hole reading as zeros
/// (`zero`), or data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub len: u64,
    pub zero: bool,
}

/// A structured reply chunk's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub len: u32,
}

/// Parses the 20 bytes after a structured reply's magic... including the
/// magic: `magic u32, flags u16, type u16, cookie u64, length u32`.
pub fn parse_chunk_header(b: &[u8; 20]) -> Result<ChunkHeader, NbdError> {
    let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    if magic != STRUCTURED_REPLY_MAGIC {
        return Err(proto(format!("bad structured reply magic {magic:#x}")));
    }
    let h = ChunkHeader {
        flags: u16::from_be_bytes([b[4], b[5]]),
        kind: u16::from_be_bytes([b[6], b[7]]),
        cookie: u64::from_be_bytes(b[8..16].try_into().expect("8 bytes")),
        len: u32::from_be_bytes([b[16], b[17], b[18], b[19]]),
    };
    if h.len > MAX_PAYLOAD {
        return Err(proto(format!("reply chunk of {} bytes", h.len)));
    }
    Ok(h)
}

/// Applies one READ reply chunk to `buf`, the answer for `[offset, offset +
/// buf.len())` (zero-filled, so a hole needs no write).
pub fn apply_read_chunk(
    kind: u16,
    payload: &[u8],
    offset: u64,
    buf: &mut [u8],
) -> Result<(), NbdError> {
    let place = |at: u64, len: u64| -> Result<usize, NbdError> {
        let rel = at
            .checked_sub(offset)
            .ok_or_else(|| proto("reply chunk before the request"))?;
        let end = rel
            .checked_add(len)
            .ok_or_else(|| proto("reply chunk overflows"))?;
        if end > buf.len() as u64 {
            return Err(proto("reply chunk beyond the request"));
        }
        Ok(rel as usize)
    };
    match kind {
        REPLY_TYPE_NONE => Ok(()),
        REPLY_TYPE_OFFSET_DATA => {
            let at = be64(payload, 0).ok_or_else(|| proto("short data chunk"))?;
            let data = &payload[8..];
            let rel = place(at, data.len() as u64)?;
            buf[rel..rel + data.len()].copy_from_slice(data);
            Ok(())
        }
        REPLY_TYPE_OFFSET_HOLE => {
            let at = be64(payload, 0).ok_or_else(|| proto("short hole chunk"))?;
            let len = be32(payload, 8).ok_or_else(|| proto("short hole chunk"))?;
            let rel = place(at, u64::from(len))?;
            buf[rel..rel + len as usize].fill(0);
            Ok(())
        }
        REPLY_TYPE_ERROR => Err(command_error(offset, payload)),
        other => Err(proto(format!("unexpected reply type {other} to a read"))),
    }
}

fn command_error(offset: u64, payload: &[u8]) -> NbdError {
    let errno = be32(payload, 0).unwrap_or(0);
    let msg_len = payload
        .get(4..6)
        .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]) as usize);
    let message = payload
        .get(6..6 + msg_len)
        .map(|m| String::from_utf8_lossy(m).into_owned())
        .unwrap_or_default();
    NbdError::Command {
        offset,
        errno,
        message,
    }
}

/// The runs of a BLOCK_STATUS chunk for context `id`: `id u32` then
/// `(length u32, flags u32)` pairs.
pub fn parse_block_status(payload: &[u8], id: u32) -> Result<Vec<Run>, NbdError> {
    let got = be32(payload, 0).ok_or_else(|| proto("short block status"))?;
    if got != id {
        return Err(proto(format!("block status for context {got}, not {id}")));
    }
    let body = &payload[4..];
    if !body.len().is_multiple_of(8) || body.is_empty() {
        return Err(proto("block status descriptors are not 8-byte pairs"));
    }
    Ok(body
        .chunks_exact(8)
        .map(|d| {
            let len = u32::from_be_bytes([d[0], d[1], d[2], d[3]]);
            let flags = u32::from_be_bytes([d[4], d[5], d[6], d[7]]);
            Run {
                len: u64::from(len),
                // A hole that does not read as zeros must still be read.
                zero: flags & STATE_ZERO != 0,
            }
        })
        .collect())
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn be64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// One connection, past the handshake.
pub struct NbdConn {
    rd: BufReader<OwnedReadHalf>,
    wr: BufWriter<OwnedWriteHalf>,
    pub size: u64,
    structured: bool,
    /// The `base:allocation` context id, when the server agreed to it.
    meta: Option<u32>,
    cookie: u64,
}

impl NbdConn {
    /// Connects to `socket` and negotiates export `name`.
    pub async fn connect(socket: &Path, name: &str) -> Result<Self, NbdError> {
        let s = UnixStream::connect(socket).await?;
        let (r, w) = s.into_split();
        let mut c = NbdConn {
            rd: BufReader::new(r),
            wr: BufWriter::new(w),
            size: 0,
            structured: false,
            meta: None,
            cookie: 0,
        };
        c.handshake(name).await?;
        Ok(c)
    }

    async fn handshake(&mut self, name: &str) -> Result<(), NbdError> {
        if self.rd.read_u64().await? != NBDMAGIC || self.rd.read_u64().await? != IHAVEOPT {
            return Err(proto("not a newstyle NBD server"));
        }
        let flags = self.rd.read_u16().await?;
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(proto("server is not fixed-newstyle"));
        }
        let mut cflags = FLAG_C_FIXED_NEWSTYLE;
        if flags & FLAG_NO_ZEROES != 0 {
            cflags |= FLAG_C_NO_ZEROES;
        }
        self.wr.write_u32(cflags).await?;
        // Structured replies: holes in reads come back without their zeros.
        self.send_option(OPT_STRUCTURED_REPLY, &[]).await?;
        let (kind, _) = self.option_reply(OPT_STRUCTURED_REPLY).await?;
        self.structured = kind == REP_ACK;
        if self.structured {
            let mut d = Vec::new();
            d.extend((name.len() as u32).to_be_bytes());
            d.extend(name.as_bytes());
            d.extend(1u32.to_be_bytes());
            d.extend((META_BASE_ALLOCATION.len() as u32).to_be_bytes());
            d.extend(META_BASE_ALLOCATION.as_bytes());
            self.send_option(OPT_SET_META_CONTEXT, &d).await?;
            loop {
                let (kind, data) = self.option_reply(OPT_SET_META_CONTEXT).await?;
                match kind {
                    REP_META_CONTEXT => {
                        if data.get(4..) == Some(META_BASE_ALLOCATION.as_bytes()) {
                            self.meta = be32(&data, 0);
                        }
                    }
                    REP_ACK => break,
                    _ => break,
                }
            }
        }
        let mut d = Vec::new();
        d.extend((name.len() as u32).to_be_bytes());
        d.extend(name.as_bytes());
        d.extend(0u16.to_be_bytes());
        self.send_option(OPT_GO, &d).await?;
        let mut size = None;
        loop {
            let (kind, data) = self.option_reply(OPT_GO).await?;
            match kind {
                REP_INFO
                    if data.len() >= 12
                        && u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT =>
                {
                    size = be64(&data, 2);
                }
                REP_ACK => break,
                k if k & REP_ERR != 0 => {
                    return Err(NbdError::Refused {
                        option: OPT_GO,
                        message: String::from_utf8_lossy(&data).into_owned(),
                    });
                }
                _ => {}
            }
        }
        self.size = size.ok_or_else(|| proto("server sent no export size"))?;
        Ok(())
    }

    async fn send_option(&mut self, opt: u32, data: &[u8]) -> Result<(), NbdError> {
        self.wr.write_u64(IHAVEOPT).await?;
        self.wr.write_u32(opt).await?;
        self.wr.write_u32(data.len() as u32).await?;
        self.wr.write_all(data).await?;
        self.wr.flush().await?;
        Ok(())
    }

    /// One option reply: its type and data. An error reply other than to
    /// OPT_GO is returned as its type, so optional features just go unused.
    async fn option_reply(&mut self, opt: u32) -> Result<(u32, Vec<u8>), NbdError> {
        if self.rd.read_u64().await? != OPTION_REPLY_MAGIC {
            return Err(proto("bad option reply magic"));
        }
        let got = self.rd.read_u32().await?;
        let kind = self.rd.read_u32().await?;
        let len = self.rd.read_u32().await?;
        if got != opt {
            return Err(proto(format!("reply to option {got}, asked {opt}")));
        }
        if len > MAX_PAYLOAD {
            return Err(proto(format!("option reply of {len} bytes")));
        }
        let mut data = vec![0u8; len as usize];
        self.rd.read_exact(&mut data).await?;
        Ok((kind, data))
    }

    async fn request(&mut self, kind: u16, offset: u64, len: u32) -> Result<u64, NbdError> {
        self.cookie = self.cookie.wrapping_add(1);
        self.wr.write_u32(REQUEST_MAGIC).await?;
        self.wr.write_u16(0).await?;
        self.wr.write_u16(kind).await?;
        self.wr.write_u64(self.cookie).await?;
        self.wr.write_u64(offset).await?;
        self.wr.write_u32(len).await?;
        self.wr.flush().await?;
        Ok(self.cookie)
    }

    /// Reads `[offset, offset + len)`, `len` at most [`MAX_READ`].
    pub async fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, NbdError> {
        if len > MAX_READ {
            return Err(proto("read larger than MAX_READ"));
        }
        let cookie = self.request(CMD_READ, offset, len).await?;
        let magic = self.rd.read_u32().await?;
        if magic == SIMPLE_REPLY_MAGIC {
            let errno = self.rd.read_u32().await?;
            let got = self.rd.read_u64().await?;
            if got != cookie {
                return Err(proto("reply to another request"));
            }
            if errno != 0 {
                return Err(NbdError::Command {
                    offset,
                    errno,
                    message: String::new(),
                });
            }
            return Ok(crate::nbd::session::read_payload(&mut self.rd, len as usize).await?);
        }
        let mut buf: Option<Vec<u8>> = None;
        let mut first = Some(magic);
        loop {
            let h = self.chunk_header(first.take()).await?;
            if h.cookie != cookie {
                return Err(proto("reply to another request"));
            }
            if h.kind == REPLY_TYPE_OFFSET_DATA
                && buf.is_none()
                && len.checked_add(8) == Some(h.len)
            {
                // The usual answer, one data chunk for the whole request:
                // read straight into the result, no staging copy.
                if self.rd.read_u64().await? != offset {
                    return Err(proto("reply chunk outside the request"));
                }
                buf = Some(crate::nbd::session::read_payload(&mut self.rd, len as usize).await?);
            } else {
                let payload = self.payload(h.len).await?;
                let b = buf.get_or_insert_with(|| vec![0u8; len as usize]);
                apply_read_chunk(h.kind, &payload, offset, b)?;
            }
            if h.flags & REPLY_FLAG_DONE != 0 {
                return Ok(buf.unwrap_or_else(|| vec![0u8; len as usize]));
            }
        }
    }

    /// Allocation of `[offset, offset + len)`: runs covering at least its
    /// start. Without `base:allocation`, the whole range is data.
    pub async fn block_status(&mut self, offset: u64, len: u32) -> Result<Vec<Run>, NbdError> {
        let Some(id) = self.meta else {
            return Ok(vec![Run {
                len: u64::from(len),
                zero: false,
            }]);
        };
        let cookie = self.request(CMD_BLOCK_STATUS, offset, len).await?;
        let mut runs = Vec::new();
        loop {
            let h = self.chunk_header(None).await?;
            if h.cookie != cookie {
                return Err(proto("reply to another request"));
            }
            let payload = self.payload(h.len).await?;
            match h.kind {
                REPLY_TYPE_BLOCK_STATUS => runs.extend(parse_block_status(&payload, id)?),
                REPLY_TYPE_NONE => {}
                REPLY_TYPE_ERROR => return Err(command_error(offset, &payload)),
                k => return Err(proto(format!("unexpected reply type {k} to block status"))),
            }
            if h.flags & REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        if runs.iter().all(|r| r.len == 0) {
            return Err(proto("block status with no extent"));
        }
        Ok(runs)
    }

    async fn chunk_header(&mut self, magic: Option<u32>) -> Result<ChunkHeader, NbdError> {
        let mut b = [0u8; 20];
        match magic {
            Some(m) => {
                b[..4].copy_from_slice(&m.to_be_bytes());
                self.rd.read_exact(&mut b[4..]).await?;
            }
            None => {
                self.rd.read_exact(&mut b).await?;
            }
        }
        if !self.structured {
            return Err(proto("structured reply without negotiation"));
        }
        parse_chunk_header(&b)
    }

    async fn payload(&mut self, len: u32) -> Result<Vec<u8>, NbdError> {
        Ok(crate::nbd::session::read_payload(&mut self.rd, len as usize).await?)
    }

    /// Says goodbye; the server closes the connection.
    pub async fn disconnect(mut self) {
        let _ = self.request(CMD_DISC, 0, 0).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn read_chunks_land_in_place() {
        let mut buf = vec![9u8; 16];
        let mut data = 104u64.to_be_bytes().to_vec();
        data.extend([1, 2, 3, 4]);
        apply_read_chunk(REPLY_TYPE_OFFSET_DATA, &data, 100, &mut buf).unwrap();
        assert_eq!(&buf[4..8], &[1, 2, 3, 4]);
        let mut hole = 100u64.to_be_bytes().to_vec();
        hole.extend(4u32.to_be_bytes());
        apply_read_chunk(REPLY_TYPE_OFFSET_HOLE, &hole, 100, &mut buf).unwrap();
        assert_eq!(&buf[..4], &[0; 4]);
        let mut beyond = 113u64.to_be_bytes().to_vec();
        beyond.extend([1, 2, 3, 4]);
        assert!(apply_read_chunk(REPLY_TYPE_OFFSET_DATA, &beyond, 100, &mut buf).is_err());
        let mut err = 5u32.to_be_bytes().to_vec();
        err.extend(2u16.to_be_bytes());
        err.extend(b"no");
        let e = apply_read_chunk(REPLY_TYPE_ERROR, &err, 100, &mut buf).unwrap_err();
        assert!(e.to_string().contains("errno=5 no"), "{e}");
    }

    #[test]
    fn block_status_runs() {
        let mut p = 1u32.to_be_bytes().to_vec();
        p.extend(4096u32.to_be_bytes());
        p.extend(3u32.to_be_bytes());
        p.extend(512u32.to_be_bytes());
        p.extend(0u32.to_be_bytes());
        assert_eq!(
            parse_block_status(&p, 1).unwrap(),
            vec![
                Run {
                    len: 4096,
                    zero: true
                },
                Run {
                    len: 512,
                    zero: false
                }
            ]
        );
        assert!(parse_block_status(&p, 2).is_err());
        assert!(parse_block_status(&p[..7], 1).is_err());
    }

    proptest! {
        #[test]
        fn parsers_never_panic(kind in any::<u16>(), payload in proptest::collection::vec(any::<u8>(), 0..64),
                               offset in any::<u64>(), len in 0usize..64, header in any::<[u8; 20]>()) {
            let mut buf = vec![0u8; len];
            let _ = apply_read_chunk(kind, &payload, offset, &mut buf);
            let _ = parse_block_status(&payload, 1);
            let _ = parse_chunk_header(&header);
        }

        #[test]
        fn data_chunks_at_u64_edges(at in (u64::MAX - 64)..=u64::MAX, n in 0usize..16) {
            let mut buf = vec![0u8; 8];
            let mut p = at.to_be_bytes().to_vec();
            p.extend(vec![1u8; n]);
            let r = apply_read_chunk(REPLY_TYPE_OFFSET_DATA, &p, u64::MAX - 8, &mut buf);
            let fits = at.checked_sub(u64::MAX - 8).is_some_and(|rel| rel + n as u64 <= 8);
            prop_assert_eq!(r.is_ok(), fits);
        }
    }
}
