//! The NBD wire format (NetworkBlockDevice/nbd `doc/proto.md`), both ways:
//! what a server encodes a client parses, and the reverse. The daemon's
//! server, its image-import client, the integration tests' raw client and
//! the benches all speak it through this crate; no other code spells a
//! magic number or a header layout.
//!
//! - `consts`: every constant, and the limits on lengths;
//! - `greeting`: the server's greeting, the client's flags, and the reply
//!   to NBD_OPT_EXPORT_NAME;
//! - `option`: option requests (header, NBD_OPT_INFO/GO data, meta-context
//!   queries);
//! - `option_reply`: option replies (header, NBD_REP_SERVER, NBD_REP_INFO,
//!   NBD_REP_META_CONTEXT);
//! - `request`: transmission requests, and `validate`, every rule a request
//!   must meet and the errno it gets when it does not;
//! - `reply`: `Reply::encode`, the exact bytes of simple and structured
//!   replies, without copying a read's data;
//! - `decode`: the reply decoder, the inverse of `Reply::encode`;
//! - `uri`: `nbd://`, `nbds://`, `nbd+unix://` and `nbds+unix://` URIs.
//!
//! Architecture invariant: everything here is pure. Bytes in, values out:
//! no tokio, no sockets, no `std::io` traits, and no allocation larger than
//! the input or a length the caller has already bounded. Every parser is
//! property-tested on arbitrary bytes, every encoder against its parser.

pub mod consts;
pub mod decode;
pub mod greeting;
pub mod option;
pub mod option_reply;
pub mod reply;
pub mod request;
pub mod uri;

#[cfg(test)]
mod alloc_probe;
#[cfg(test)]
mod decode_tests;

use thiserror::Error;

pub use consts::*;
pub use greeting::{
    ClientFlags, Greeting, encode_export_name_reply, encode_greeting, parse_client_flags,
    parse_export_name_reply,
};
pub use option::{
    InfoRequest, MetaRequest, OptionHeader, encode_option, parse_info_request, parse_meta_request,
};
pub use option_reply::{
    Info, MetaContextReply, OptionReplyHeader, encode_option_reply, info_block_size, info_export,
    info_string, meta_context_data, parse_rep_server, rep_server_data,
};
pub use reply::{
    BlockExtent, Encoded, Piece, Reply, ReplyBody, encode_simple_reply, encode_structured_header,
    error_payload,
};
pub use request::{Command, RangeError, Refusal, Request, SessionOptions, check_range, validate};
pub use uri::{Transport, Uri, UriError};

/// Bytes that break the protocol: for a server, the session ends; for a
/// client, the connection can no longer be trusted.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProtoError {
    #[error("not a newstyle NBD server: greeting magic={magic:#018x} {ihaveopt:#018x}")]
    Greeting { magic: u64, ihaveopt: u64 },
    #[error("bad option magic {0:#018x}")]
    OptionMagic(u64),
    #[error("bad option reply magic {0:#018x}")]
    OptionReplyMagic(u64),
    #[error("bad request magic {0:#010x}")]
    RequestMagic(u32),
    #[error("bad reply magic {0:#010x}")]
    ReplyMagic(u32),
    #[error("unknown client flags {0:#x}")]
    ClientFlags(u32),
    #[error("{what} has the wrong length: len={len}")]
    Length { what: &'static str, len: usize },
    #[error("{what} longer than the limit: len={len} max={max}")]
    TooLong {
        what: &'static str,
        len: u64,
        max: u64,
    },
    #[error("{what} is not UTF-8")]
    Utf8 { what: &'static str },
    #[error("reply chunk outside the request: offset={offset} len={len}")]
    OutsideRequest { offset: u64, len: u64 },
    #[error("unexpected reply chunk type {0}")]
    UnexpectedChunk(u16),
}

/// A value that cannot be put on the wire: a length that does not fit its
/// field, or a reply with nothing to say. Callers keep their values within
/// the protocol's limits, so this means a bug, not a peer's mistake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum EncodeError {
    #[error("{what} too long for its length field: len={len}")]
    TooLong { what: &'static str, len: u64 },
    #[error("read reply runs past the end of a 64-bit export: offset={offset}")]
    OffsetOverflow { offset: u64 },
    #[error("structured read reply without any piece")]
    EmptyRead,
    #[error("block status reply without any context")]
    EmptyBlockStatus,
}

pub(crate) fn fit_u32(what: &'static str, len: usize) -> Result<u32, EncodeError> {
    u32::try_from(len).map_err(|_| EncodeError::TooLong {
        what,
        len: len as u64,
    })
}

pub(crate) fn fit_u16(what: &'static str, len: usize) -> Result<u16, EncodeError> {
    u16::try_from(len).map_err(|_| EncodeError::TooLong {
        what,
        len: len as u64,
    })
}

/// Appends a u32-length-prefixed string.
pub(crate) fn put_string(
    out: &mut Vec<u8>,
    what: &'static str,
    s: &str,
) -> Result<(), EncodeError> {
    out.extend_from_slice(&fit_u32(what, s.len())?.to_be_bytes());
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

pub(crate) fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b.try_into().expect("two bytes by construction"))
}
pub(crate) fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b.try_into().expect("four bytes by construction"))
}
pub(crate) fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b.try_into().expect("eight bytes by construction"))
}

/// A cursor over untrusted bytes; every take is bounds-checked.
pub(crate) struct Reader<'a>(pub(crate) &'a [u8]);

impl<'a> Reader<'a> {
    pub(crate) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    pub(crate) fn u16(&mut self) -> Option<u16> {
        self.take(2).map(be_u16)
    }
    pub(crate) fn u32(&mut self) -> Option<u32> {
        self.take(4).map(be_u32)
    }
    /// A u32-length-prefixed UTF-8 string of at most [`MAX_STRING`] bytes.
    pub(crate) fn str(&mut self) -> Option<&'a str> {
        let len = self.u32()? as usize;
        if len > MAX_STRING {
            return None;
        }
        std::str::from_utf8(self.take(len)?).ok()
    }
    pub(crate) fn string(&mut self) -> Option<String> {
        self.str().map(str::to_owned)
    }
}
