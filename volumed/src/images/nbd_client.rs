//! A small NBD client: the fixed-newstyle handshake with structured replies
//! and `base:allocation`, then READ and BLOCK_STATUS one request at a time.
//! Parallelism comes from several connections (see `source::NbdPool`), which
//! keeps each connection a plain request-answer loop. The wire format is
//! `nbd_proto`'s, both ways; this file is the I/O loop, and the mapping of
//! what the server said into `Run`s and `NbdError`s. Lengths from the
//! server are bounded before anything is allocated for them.

use std::io;
use std::path::Path;

use nbd_proto::decode::{Chunk, ChunkHeader, SimpleReplyHeader};
use nbd_proto::{
    ClientFlags, Command, EncodeError, GREETING_LEN, Greeting, Info, InfoRequest, MAX_PAYLOAD,
    META_BASE_ALLOCATION, MetaContextReply, MetaRequest, OPT_GO, OPT_SET_META_CONTEXT,
    OPT_STRUCTURED_REPLY, OPTION_REPLY_HEADER_LEN, OptionReplyHeader, ProtoError, REP_ACK, REP_ERR,
    REP_INFO, REP_META_CONTEXT, REPLY_TYPE_BLOCK_STATUS, REPLY_TYPE_OFFSET_DATA, Request,
    SIMPLE_REPLY_HEADER_LEN, SIMPLE_REPLY_MAGIC, STATE_ZERO, STRUCTURED_REPLY_HEADER_LEN,
    encode_option, max_read_chunk,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// The largest READ this client asks for: an import reads its image one
/// chunk at a time, and a chunk is at most 4 MiB.
pub const MAX_READ: u32 = 4 << 20;
const _: () = assert!(
    MAX_READ <= MAX_PAYLOAD,
    "a server that works with qemu accepts every read we send"
);

/// The longest reply chunk or option reply accepted: nothing this client
/// asks for can legitimately get more than one READ's data in one chunk.
const MAX_REPLY: u32 = max_read_chunk(MAX_READ);

#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("nbd i/o")]
    Io(#[from] io::Error),
    #[error("nbd protocol: {0}")]
    Protocol(String),
    #[error("nbd protocol")]
    Wire(#[from] ProtoError),
    #[error("nbd request")]
    Encode(#[from] EncodeError),
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

/// A structured reply chunk's header, its length bounded by [`MAX_REPLY`].
pub fn parse_chunk_header(b: &[u8; STRUCTURED_REPLY_HEADER_LEN]) -> Result<ChunkHeader, NbdError> {
    let h = ChunkHeader::parse(b)?;
    h.payload_len(MAX_REPLY)?;
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
    match Chunk::parse(kind, payload)? {
        Chunk::Error { errno, message } => Err(command_error(offset, errno, message)),
        chunk => Ok(chunk.apply_read(offset, buf)?),
    }
}

fn command_error(offset: u64, errno: u32, message: &[u8]) -> NbdError {
    NbdError::Command {
        offset,
        errno,
        message: String::from_utf8_lossy(message).into_owned(),
    }
}

/// The runs of a BLOCK_STATUS chunk for context `id`; at least one.
pub fn parse_block_status(payload: &[u8], id: u32) -> Result<Vec<Run>, NbdError> {
    let Chunk::BlockStatus { context, extents } = Chunk::parse(REPLY_TYPE_BLOCK_STATUS, payload)?
    else {
        return Err(proto("block status chunk of another kind"));
    };
    if context != id {
        return Err(proto(format!(
            "block status for context {context}, not {id}"
        )));
    }
    if extents.is_empty() {
        return Err(proto("block status chunk without an extent"));
    }
    Ok(extents
        .iter()
        .map(|e| Run {
            len: e.len,
            // A hole that does not read as zeros must still be read.
            zero: e.flags & STATE_ZERO != 0,
        })
        .collect())
}

/// Exactly `len` bytes (already bounded by the caller) into a new buffer,
/// not zeroed first: the payload overwrites it. The NBD server's session
/// has the same loop; the client keeps its own so that images never import
/// from the NBD front-end.
async fn read_payload<R: AsyncRead + Unpin>(r: &mut R, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(len);
    while buf.len() < len {
        // `read_buf` fills only the spare capacity: never past `len`.
        if r.read_buf(&mut buf).await? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "early eof"));
        }
    }
    Ok(buf)
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
        let mut g = [0u8; GREETING_LEN];
        self.rd.read_exact(&mut g).await?;
        let greeting = Greeting::parse(&g)?;
        if !greeting.fixed_newstyle() {
            return Err(proto("server is not fixed-newstyle"));
        }
        let flags = ClientFlags {
            fixed_newstyle: true,
            no_zeroes: greeting.no_zeroes(),
        };
        self.wr.write_all(&flags.to_wire().to_be_bytes()).await?;
        // Structured replies: holes in reads come back without their zeros.
        self.send_option(OPT_STRUCTURED_REPLY, &[]).await?;
        let (kind, _) = self.option_reply(OPT_STRUCTURED_REPLY).await?;
        self.structured = kind == REP_ACK;
        if self.structured {
            let d = MetaRequest {
                name: name.to_owned(),
                queries: vec![META_BASE_ALLOCATION.to_owned()],
            }
            .encode()?;
            self.send_option(OPT_SET_META_CONTEXT, &d).await?;
            loop {
                let (kind, data) = self.option_reply(OPT_SET_META_CONTEXT).await?;
                match kind {
                    REP_META_CONTEXT => {
                        if let Ok(m) = MetaContextReply::parse(&data)
                            && m.name == META_BASE_ALLOCATION
                        {
                            self.meta = Some(m.id);
                        }
                    }
                    REP_ACK => break,
                    _ => break,
                }
            }
        }
        let d = InfoRequest {
            name: name.to_owned(),
            requests: Vec::new(),
        }
        .encode()?;
        self.send_option(OPT_GO, &d).await?;
        let mut size = None;
        loop {
            let (kind, data) = self.option_reply(OPT_GO).await?;
            match kind {
                REP_INFO => {
                    if let Ok(Info::Export { size: s, .. }) = Info::parse(&data) {
                        size = Some(s);
                    }
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
        let mut b = Vec::new();
        encode_option(&mut b, opt, data)?;
        self.wr.write_all(&b).await?;
        self.wr.flush().await?;
        Ok(())
    }

    /// One option reply: its type and data. An error reply other than to
    /// OPT_GO is returned as its type, so optional features just go unused.
    async fn option_reply(&mut self, opt: u32) -> Result<(u32, Vec<u8>), NbdError> {
        let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
        self.rd.read_exact(&mut h).await?;
        let h = OptionReplyHeader::parse(&h)?;
        if h.option != opt {
            return Err(proto(format!("reply to option {}, asked {opt}", h.option)));
        }
        let len = h.data_len(MAX_REPLY)?;
        let mut data = vec![0u8; len];
        self.rd.read_exact(&mut data).await?;
        Ok((h.reply, data))
    }

    async fn request(&mut self, command: Command, offset: u64, len: u32) -> Result<u64, NbdError> {
        self.cookie = self.cookie.wrapping_add(1);
        let req = Request {
            flags: 0,
            command,
            cookie: self.cookie,
            offset,
            length: len,
        };
        self.wr.write_all(&req.encode()).await?;
        self.wr.flush().await?;
        Ok(self.cookie)
    }

    /// Reads `[offset, offset + len)`, `len` at most [`MAX_READ`].
    pub async fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, NbdError> {
        if len > MAX_READ {
            return Err(proto("read larger than MAX_READ"));
        }
        let cookie = self.request(Command::Read, offset, len).await?;
        let magic = self.rd.read_u32().await?;
        if magic == SIMPLE_REPLY_MAGIC {
            let mut h = [0u8; SIMPLE_REPLY_HEADER_LEN];
            h[..4].copy_from_slice(&magic.to_be_bytes());
            self.rd.read_exact(&mut h[4..]).await?;
            let h = SimpleReplyHeader::parse(&h)?;
            if h.cookie != cookie {
                return Err(proto("reply to another request"));
            }
            if h.errno != 0 {
                return Err(NbdError::Command {
                    offset,
                    errno: h.errno,
                    message: String::new(),
                });
            }
            return Ok(read_payload(&mut self.rd, len as usize).await?);
        }
        let mut buf: Option<Vec<u8>> = None;
        let mut first = Some(magic);
        loop {
            let h = self.chunk_header(first.take()).await?;
            if h.cookie != cookie {
                return Err(proto("reply to another request"));
            }
            if h.typ == REPLY_TYPE_OFFSET_DATA && buf.is_none() && h.len == max_read_chunk(len) {
                // The usual answer, one data chunk for the whole request:
                // read straight into the result, no staging copy.
                if self.rd.read_u64().await? != offset {
                    return Err(proto("reply chunk outside the request"));
                }
                buf = Some(read_payload(&mut self.rd, len as usize).await?);
            } else {
                let payload = self.payload(h.len).await?;
                let b = buf.get_or_insert_with(|| vec![0u8; len as usize]);
                apply_read_chunk(h.typ, &payload, offset, b)?;
            }
            if h.done() {
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
        let cookie = self.request(Command::BlockStatus, offset, len).await?;
        let mut runs = Vec::new();
        loop {
            let h = self.chunk_header(None).await?;
            if h.cookie != cookie {
                return Err(proto("reply to another request"));
            }
            let payload = self.payload(h.len).await?;
            if h.typ == REPLY_TYPE_BLOCK_STATUS {
                runs.extend(parse_block_status(&payload, id)?);
            } else {
                match Chunk::parse(h.typ, &payload)? {
                    Chunk::None => {}
                    Chunk::Error { errno, message } => {
                        return Err(command_error(offset, errno, message));
                    }
                    _ => {
                        return Err(proto(format!(
                            "unexpected reply type {} to block status",
                            h.typ
                        )));
                    }
                }
            }
            if h.done() {
                break;
            }
        }
        if runs.iter().all(|r| r.len == 0) {
            return Err(proto("block status with no extent"));
        }
        Ok(runs)
    }

    async fn chunk_header(&mut self, magic: Option<u32>) -> Result<ChunkHeader, NbdError> {
        let mut b = [0u8; STRUCTURED_REPLY_HEADER_LEN];
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

    /// A chunk's payload; its length was bounded by [`parse_chunk_header`].
    async fn payload(&mut self, len: u32) -> Result<Vec<u8>, NbdError> {
        Ok(read_payload(&mut self.rd, len as usize).await?)
    }

    /// Says goodbye; the server closes the connection.
    pub async fn disconnect(mut self) {
        let _ = self.request(Command::Disc, 0, 0).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nbd_proto::{REPLY_TYPE_ERROR, REPLY_TYPE_OFFSET_HOLE};
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

    #[tokio::test]
    async fn payloads_are_read_to_their_length_and_no_further() {
        let (mut tx, mut rx) = tokio::io::duplex(7);
        let writer = tokio::spawn(async move {
            tx.write_all(&[7u8; 100]).await.unwrap();
            tx.write_all(b"next").await.unwrap();
        });
        assert_eq!(read_payload(&mut rx, 100).await.unwrap(), vec![7u8; 100]);
        let mut next = [0u8; 4];
        rx.read_exact(&mut next).await.unwrap();
        assert_eq!(&next, b"next");
        writer.await.unwrap();
        let (mut tx, mut rx) = tokio::io::duplex(64);
        tx.write_all(b"short").await.unwrap();
        drop(tx);
        let err = read_payload(&mut rx, 10).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
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
