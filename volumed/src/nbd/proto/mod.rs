//! The NBD wire format (NetworkBlockDevice/nbd `doc/proto.md`): constants,
//! parsers and encoders. All integers are big-endian on the wire.
//!
//! Everything here is pure so it can be tested on arbitrary bytes; nothing
//! here allocates more than a caller-supplied, already bounded length.
//! This file has the constants and the handshake's messages (greeting,
//! options and their replies); [`request`] has the transmission requests
//! and their validation, [`reply`] the transmission replies.

#[cfg(test)]
pub(crate) mod decode;
pub mod reply;
pub mod request;

use thiserror::Error;

pub use reply::{
    BlockExtent, EncodeError, Encoded, Piece, Reply, ReplyBody, encode_simple_reply,
    encode_structured_header, error_payload,
};
pub use request::{
    Command, MAX_PAYLOAD, RangeError, Refusal, Request, SessionOptions, check_range, validate,
};

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
pub const REP_ERR_POLICY: u32 = REP_ERR | 2;
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
pub const REP_ERR_TLS_REQD: u32 = REP_ERR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR | 7;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;

// Info types of NBD_REP_INFO.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Structured reply chunk types and flags.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
pub const STRUCTURED_REPLY_HEADER_LEN: usize = 20;

// base:allocation, the one metadata context: its name, the id we give it,
// and its extent flags.
pub const META_BASE_ALLOCATION: &str = "base:allocation";
pub const META_BASE_ALLOCATION_ID: u32 = 1;
/// qemu's namespace for dirty bitmaps, which backup tools (virtnbdbackup,
/// oVirt imageio, Proxmox) read incrementals through: bit 0 set = changed.
pub const META_QEMU_DIRTY_BITMAP: &str = "qemu:dirty-bitmap:";
/// The same contexts under our own namespace, as the spec asks of servers
/// for anything not registered.
pub const META_VOLUMED_CHANGED: &str = "x-volumed:changed:";
pub const STATE_DIRTY: u32 = 1 << 0;
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

// Errors of replies (errno values fixed by the protocol, not the host's).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Strings (export names, messages) are at most 4096 bytes by the spec.
pub const MAX_STRING: usize = 4096;

pub const OPTION_HEADER_LEN: usize = 16;
pub const REQUEST_HEADER_LEN: usize = 28;
pub const SIMPLE_REPLY_HEADER_LEN: usize = 16;

/// A violation that ends the session: the stream can no longer be trusted.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProtoError {
    #[error("bad option magic {0:#018x}")]
    OptionMagic(u64),
    #[error("bad request magic {0:#010x}")]
    RequestMagic(u32),
    #[error("unknown client flags {0:#x}")]
    ClientFlags(u32),
}

/// Client flags, after checking that no unknown bit is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    pub fixed_newstyle: bool,
    pub no_zeroes: bool,
}

pub fn parse_client_flags(flags: u32) -> Result<ClientFlags, ProtoError> {
    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(ProtoError::ClientFlags(flags));
    }
    Ok(ClientFlags {
        fixed_newstyle: flags & FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: flags & FLAG_C_NO_ZEROES != 0,
    })
}

/// The server's greeting: magic, IHAVEOPT, handshake flags.
pub fn encode_greeting() -> [u8; 18] {
    let mut b = [0u8; 18];
    b[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

impl OptionHeader {
    pub fn parse(b: &[u8; OPTION_HEADER_LEN]) -> Result<Self, ProtoError> {
        let magic = be_u64(&b[..8]);
        if magic != IHAVEOPT {
            return Err(ProtoError::OptionMagic(magic));
        }
        Ok(OptionHeader {
            option: be_u32(&b[8..12]),
            length: be_u32(&b[12..16]),
        })
    }
}

/// Data of NBD_OPT_INFO and NBD_OPT_GO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub requests: Vec<u16>,
}

/// Parses NBD_OPT_INFO/GO data: u32 name length, name, u16 count, u16 each.
/// The error is a message for NBD_REP_ERR_INVALID.
pub fn parse_info_request(data: &[u8]) -> Result<InfoRequest, &'static str> {
    let mut r = Reader(data);
    let name_len = r.u32().ok_or("option data too short for the name length")? as usize;
    if name_len > MAX_STRING {
        return Err("export name longer than 4096 bytes");
    }
    let name = r
        .take(name_len)
        .ok_or("export name runs past the option data")?;
    let name = std::str::from_utf8(name)
        .map_err(|_| "export name is not UTF-8")?
        .to_owned();
    let count = r
        .u16()
        .ok_or("option data too short for the info request count")? as usize;
    // Each request is two bytes, so the count is bounded by the data length.
    if r.0.len() != count * 2 {
        return Err("info request count does not match the option length");
    }
    let requests =
        r.0.chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect();
    Ok(InfoRequest { name, requests })
}

/// Data of NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    pub name: String,
    pub queries: Vec<String>,
}

/// Parses meta-context option data: u32 name length, name, u32 query
/// count, then each query as u32 length + string. The count cannot ask for
/// more than the data holds: every query takes at least four bytes.
pub fn parse_meta_request(data: &[u8]) -> Result<MetaRequest, &'static str> {
    let mut r = Reader(data);
    let name = r
        .string()
        .ok_or("bad export name in meta context request")?;
    let count = r.u32().ok_or("option data too short for the query count")? as usize;
    if count > r.0.len() / 4 {
        return Err("query count exceeds the option data");
    }
    let mut queries = Vec::with_capacity(count);
    for _ in 0..count {
        queries.push(r.string().ok_or("bad query in meta context request")?);
    }
    if !r.0.is_empty() {
        return Err("trailing bytes after the last query");
    }
    Ok(MetaRequest { name, queries })
}

/// NBD_REP_META_CONTEXT data: u32 context id, then the name.
pub fn meta_context_data(id: u32, name: &str) -> Vec<u8> {
    let mut d = Vec::with_capacity(4 + name.len());
    d.extend_from_slice(&id.to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d
}

/// An option reply: magic, option, type, length, data.
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    let len = u32::try_from(data.len()).expect("option replies are built from bounded strings");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(data);
}

/// NBD_REP_SERVER data: u32 name length, then the name.
pub fn rep_server_data(name: &str) -> Vec<u8> {
    let mut d = Vec::with_capacity(4 + name.len());
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d
}

pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut d = Vec::with_capacity(12);
    d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    d.extend_from_slice(&size.to_be_bytes());
    d.extend_from_slice(&flags.to_be_bytes());
    d
}

pub fn info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut d = Vec::with_capacity(14);
    d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    for v in [min, preferred, max] {
        d.extend_from_slice(&v.to_be_bytes());
    }
    d
}

/// NBD_INFO_NAME or NBD_INFO_DESCRIPTION.
pub fn info_string(kind: u16, s: &str) -> Vec<u8> {
    let mut d = Vec::with_capacity(2 + s.len());
    d.extend_from_slice(&kind.to_be_bytes());
    d.extend_from_slice(s.as_bytes());
    d
}

/// Reply to NBD_OPT_EXPORT_NAME: size, flags, and 124 zero bytes unless the
/// client negotiated NO_ZEROES.
pub fn encode_export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut d = Vec::with_capacity(134);
    d.extend_from_slice(&size.to_be_bytes());
    d.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        d.extend_from_slice(&[0u8; 124]);
    }
    d
}

/// Maps a host I/O error to the NBD errno the client sees.
pub fn errno_of(e: &std::io::Error) -> u32 {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => ENOSPC,
        Some(libc::ENOMEM) => ENOMEM,
        Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::EROFS) => EPERM,
        _ => EIO,
    }
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b.try_into().expect("two bytes by construction"))
}
fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b.try_into().expect("four bytes by construction"))
}
fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b.try_into().expect("eight bytes by construction"))
}

/// A cursor over untrusted bytes; every take is bounds-checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(be_u16)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(be_u32)
    }
    /// A u32-length-prefixed UTF-8 string of at most [`MAX_STRING`] bytes.
    fn string(&mut self) -> Option<String> {
        let len = self.u32()? as usize;
        if len > MAX_STRING {
            return None;
        }
        std::str::from_utf8(self.take(len)?).ok().map(str::to_owned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn info_data(name: &str, reqs: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
        for r in reqs {
            d.extend_from_slice(&r.to_be_bytes());
        }
        d
    }

    #[test]
    fn greeting_bytes() {
        let g = encode_greeting();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..], &[0, 3]);
    }

    #[test]
    fn client_flags() {
        assert_eq!(
            parse_client_flags(3),
            Ok(ClientFlags {
                fixed_newstyle: true,
                no_zeroes: true
            })
        );
        assert_eq!(parse_client_flags(4), Err(ProtoError::ClientFlags(4)));
    }

    #[test]
    fn info_request_round_trip_and_errors() {
        let d = info_data("data", &[INFO_BLOCK_SIZE, INFO_NAME]);
        assert_eq!(
            parse_info_request(&d),
            Ok(InfoRequest {
                name: "data".into(),
                requests: vec![INFO_BLOCK_SIZE, INFO_NAME]
            })
        );
        assert!(parse_info_request(&d[..d.len() - 1]).is_err());
        assert!(parse_info_request(&[0, 0, 0xff, 0xff]).is_err());
        assert!(parse_info_request(&[]).is_err());
        let mut extra = d.clone();
        extra.push(0);
        assert!(parse_info_request(&extra).is_err());
    }

    fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    #[test]
    fn meta_request_parse_and_errors() {
        let d = meta_data("vol", &["base:allocation", "x-y:z"]);
        assert_eq!(
            parse_meta_request(&d),
            Ok(MetaRequest {
                name: "vol".into(),
                queries: vec!["base:allocation".into(), "x-y:z".into()]
            })
        );
        assert!(parse_meta_request(&d[..d.len() - 1]).is_err());
        // A count claiming four billion queries is refused before any allocation.
        let mut huge = meta_data("vol", &[]);
        let n = huge.len();
        huge[n - 4..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_meta_request(&huge).is_err());
        let mut trailing = d.clone();
        trailing.push(1);
        assert!(parse_meta_request(&trailing).is_err());
    }

    proptest! {
        #[test]
        fn meta_request_never_panics(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_meta_request(&data);
        }

        #[test]
        fn meta_request_round_trips(name in "[a-z]{0,20}", qs in proptest::collection::vec("[a-z:]{0,30}", 0..8)) {
            let refs: Vec<&str> = qs.iter().map(String::as_str).collect();
            let parsed = parse_meta_request(&meta_data(&name, &refs)).unwrap();
            prop_assert_eq!(parsed, MetaRequest { name, queries: qs });
        }

        #[test]
        fn info_request_never_panics(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_info_request(&data);
        }

        #[test]
        fn info_request_round_trips(name in "[a-z0-9._-]{0,64}", reqs in proptest::collection::vec(any::<u16>(), 0..20)) {
            let parsed = parse_info_request(&info_data(&name, &reqs)).unwrap();
            prop_assert_eq!(parsed, InfoRequest { name, requests: reqs });
        }

        #[test]
        fn option_headers_never_panic(h in proptest::array::uniform16(any::<u8>())) {
            let _ = OptionHeader::parse(&h);
        }

    }
}
