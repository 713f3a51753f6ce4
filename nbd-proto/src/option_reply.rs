//! Option replies of the handshake: the 20-byte header, and the data of the
//! replies that carry structure (NBD_REP_SERVER, NBD_REP_INFO and
//! NBD_REP_META_CONTEXT). An error reply's data is a message for people.

use crate::{
    INFO_BLOCK_SIZE, INFO_DESCRIPTION, INFO_EXPORT, INFO_NAME, OPTION_REPLY_HEADER_LEN,
    OPTION_REPLY_MAGIC, ProtoError, REP_ERR, Reader, be_u16, be_u32, be_u64, fit_u32,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply: u32,
    pub length: u32,
}

impl OptionReplyHeader {
    pub fn parse(b: &[u8; OPTION_REPLY_HEADER_LEN]) -> Result<Self, ProtoError> {
        let magic = be_u64(&b[..8]);
        if magic != OPTION_REPLY_MAGIC {
            return Err(ProtoError::OptionReplyMagic(magic));
        }
        Ok(OptionReplyHeader {
            option: be_u32(&b[8..12]),
            reply: be_u32(&b[12..16]),
            length: be_u32(&b[16..20]),
        })
    }

    pub fn encode(&self) -> [u8; OPTION_REPLY_HEADER_LEN] {
        let mut b = [0u8; OPTION_REPLY_HEADER_LEN];
        b[..8].copy_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        b[8..12].copy_from_slice(&self.option.to_be_bytes());
        b[12..16].copy_from_slice(&self.reply.to_be_bytes());
        b[16..].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// An NBD_REP_ERR_* reply: its data is a message.
    pub fn is_error(&self) -> bool {
        self.reply & REP_ERR != 0
    }
}

/// An option reply: magic, option, type, length, data.
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    let length = fit_u32("option reply", data.len())
        .expect("option replies are built from strings of at most MAX_STRING bytes");
    out.extend_from_slice(
        &OptionReplyHeader {
            option,
            reply,
            length,
        }
        .encode(),
    );
    out.extend_from_slice(data);
}

/// NBD_REP_SERVER data: u32 name length, then the name.
pub fn rep_server_data(name: &str) -> Vec<u8> {
    let mut d = Vec::with_capacity(4 + name.len());
    // Export names come from `ExportLookup`, never longer than a path.
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d
}

/// The export name of NBD_REP_SERVER data, and the description that may
/// follow it (the rest of the data).
pub fn parse_rep_server(data: &[u8]) -> Result<(&str, &str), ProtoError> {
    let mut r = Reader(data);
    let name = r.str().ok_or(ProtoError::Length {
        what: "NBD_REP_SERVER name",
        len: data.len(),
    })?;
    let description = std::str::from_utf8(r.0).map_err(|_| ProtoError::Utf8 {
        what: "NBD_REP_SERVER description",
    })?;
    Ok((name, description))
}

/// The data of NBD_REP_INFO: one piece of information about an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Info<'a> {
    Export {
        size: u64,
        flags: u16,
    },
    Name(&'a str),
    Description(&'a str),
    BlockSize {
        min: u32,
        preferred: u32,
        max: u32,
    },
    /// A type this crate does not know; clients ignore it.
    Unknown {
        kind: u16,
        data: &'a [u8],
    },
}

impl<'a> Info<'a> {
    pub fn encode(&self) -> Vec<u8> {
        let (kind, body): (u16, Vec<u8>) = match *self {
            Info::Export { size, flags } => {
                let mut b = size.to_be_bytes().to_vec();
                b.extend_from_slice(&flags.to_be_bytes());
                (INFO_EXPORT, b)
            }
            Info::Name(s) => (INFO_NAME, s.as_bytes().to_vec()),
            Info::Description(s) => (INFO_DESCRIPTION, s.as_bytes().to_vec()),
            Info::BlockSize {
                min,
                preferred,
                max,
            } => (
                INFO_BLOCK_SIZE,
                [min, preferred, max]
                    .iter()
                    .flat_map(|v| v.to_be_bytes())
                    .collect(),
            ),
            Info::Unknown { kind, data } => (kind, data.to_vec()),
        };
        let mut d = Vec::with_capacity(2 + body.len());
        d.extend_from_slice(&kind.to_be_bytes());
        d.extend_from_slice(&body);
        d
    }

    /// Strict about each known type's length, as the spec fixes it.
    pub fn parse(data: &'a [u8]) -> Result<Self, ProtoError> {
        let short = |what| ProtoError::Length {
            what,
            len: data.len(),
        };
        let mut r = Reader(data);
        let kind = r.u16().ok_or(short("NBD_REP_INFO"))?;
        let body = r.0;
        let text = |what| std::str::from_utf8(body).map_err(|_| ProtoError::Utf8 { what });
        Ok(match kind {
            INFO_EXPORT if body.len() == 10 => Info::Export {
                size: be_u64(&body[..8]),
                flags: be_u16(&body[8..]),
            },
            INFO_EXPORT => return Err(short("NBD_INFO_EXPORT")),
            INFO_NAME => Info::Name(text("NBD_INFO_NAME")?),
            INFO_DESCRIPTION => Info::Description(text("NBD_INFO_DESCRIPTION")?),
            INFO_BLOCK_SIZE if body.len() == 12 => Info::BlockSize {
                min: be_u32(&body[..4]),
                preferred: be_u32(&body[4..8]),
                max: be_u32(&body[8..]),
            },
            INFO_BLOCK_SIZE => return Err(short("NBD_INFO_BLOCK_SIZE")),
            kind => Info::Unknown { kind, data: body },
        })
    }
}

pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    Info::Export { size, flags }.encode()
}

pub fn info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    Info::BlockSize {
        min,
        preferred,
        max,
    }
    .encode()
}

/// NBD_INFO_NAME or NBD_INFO_DESCRIPTION.
pub fn info_string(kind: u16, s: &str) -> Vec<u8> {
    let mut d = Vec::with_capacity(2 + s.len());
    d.extend_from_slice(&kind.to_be_bytes());
    d.extend_from_slice(s.as_bytes());
    d
}

/// NBD_REP_META_CONTEXT data: u32 context id, then the name.
pub fn meta_context_data(id: u32, name: &str) -> Vec<u8> {
    let mut d = Vec::with_capacity(4 + name.len());
    d.extend_from_slice(&id.to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d
}

/// NBD_REP_META_CONTEXT: the id a context gets and its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetaContextReply<'a> {
    pub id: u32,
    pub name: &'a str,
}

impl<'a> MetaContextReply<'a> {
    pub fn parse(data: &'a [u8]) -> Result<Self, ProtoError> {
        let mut r = Reader(data);
        let id = r.u32().ok_or(ProtoError::Length {
            what: "NBD_REP_META_CONTEXT",
            len: data.len(),
        })?;
        let name = std::str::from_utf8(r.0).map_err(|_| ProtoError::Utf8 {
            what: "meta context name",
        })?;
        Ok(MetaContextReply { id, name })
    }

    pub fn encode(&self) -> Vec<u8> {
        meta_context_data(self.id, self.name)
    }
}

impl OptionReplyHeader {
    /// The length of the data to read, once checked against `max`: a
    /// client bounds what a server can make it allocate.
    pub fn data_len(&self, max: u32) -> Result<usize, ProtoError> {
        if self.length > max {
            return Err(ProtoError::TooLong {
                what: "option reply",
                len: u64::from(self.length),
                max: u64::from(max),
            });
        }
        Ok(self.length as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alloc_probe::largest_allocation;
    use crate::{OPT_GO, REP_ACK, REP_ERR_UNKNOWN, REP_INFO};
    use proptest::prelude::*;

    #[test]
    fn option_reply_bytes() {
        let mut out = Vec::new();
        encode_option_reply(&mut out, OPT_GO, REP_INFO, &info_export(512, 3));
        let mut want = vec![0, 3, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9];
        want.extend_from_slice(&[0, 0, 0, 7, 0, 0, 0, 3, 0, 0, 0, 12, 0, 0]);
        want.extend_from_slice(&512u64.to_be_bytes());
        want.extend_from_slice(&[0, 3]);
        assert_eq!(out, want);
        let h = OptionReplyHeader::parse(out[..20].try_into().unwrap()).unwrap();
        assert_eq!((h.option, h.reply, h.length), (OPT_GO, REP_INFO, 12));
        assert!(!h.is_error());
        assert_eq!(
            Info::parse(&out[20..]),
            Ok(Info::Export {
                size: 512,
                flags: 3
            })
        );
        let err = OptionReplyHeader {
            option: OPT_GO,
            reply: REP_ERR_UNKNOWN,
            length: 0,
        };
        assert!(err.is_error());
        assert_eq!(err.data_len(0), Ok(0));
        let ack = OptionReplyHeader {
            reply: REP_ACK,
            length: 5,
            ..err
        };
        assert!(ack.data_len(4).is_err());
    }

    #[test]
    fn info_lengths_are_exact() {
        assert!(Info::parse(&[0, 0, 1, 2]).is_err());
        assert!(Info::parse(&[0, 3, 0, 0, 0, 1]).is_err());
        assert!(Info::parse(&[0]).is_err());
        assert_eq!(
            Info::parse(&[0, 9, 1]),
            Ok(Info::Unknown {
                kind: 9,
                data: &[1]
            })
        );
        assert_eq!(parse_rep_server(&rep_server_data("v")), Ok(("v", "")));
        let mut with_desc = rep_server_data("v");
        with_desc.extend_from_slice(b"a volume");
        assert_eq!(parse_rep_server(&with_desc), Ok(("v", "a volume")));
        assert!(parse_rep_server(&[0, 0, 0, 5, b'v']).is_err());
    }

    fn arb_info() -> impl Strategy<Value = (u16, Vec<u8>)> {
        prop_oneof![
            (any::<u64>(), any::<u16>())
                .prop_map(|(size, flags)| (0, Info::Export { size, flags }.encode())),
            ".{0,40}".prop_map(|s| (1, info_string(INFO_NAME, &s))),
            ".{0,40}".prop_map(|s| (2, info_string(INFO_DESCRIPTION, &s))),
            (any::<u32>(), any::<u32>(), any::<u32>())
                .prop_map(|(a, b, c)| (3, info_block_size(a, b, c))),
            (4u16.., proptest::collection::vec(any::<u8>(), 0..20))
                .prop_map(|(k, d)| (k, Info::Unknown { kind: k, data: &d }.encode())),
        ]
    }

    proptest! {
        #[test]
        fn option_reply_headers_round_trip(option in any::<u32>(), reply in any::<u32>(), length in any::<u32>()) {
            let h = OptionReplyHeader { option, reply, length };
            prop_assert_eq!(OptionReplyHeader::parse(&h.encode()), Ok(h));
        }

        #[test]
        fn option_reply_headers_never_panic(b in any::<[u8; OPTION_REPLY_HEADER_LEN]>()) {
            let _ = OptionReplyHeader::parse(&b);
        }

        #[test]
        fn infos_round_trip((kind, bytes) in arb_info()) {
            let info = Info::parse(&bytes).unwrap();
            prop_assert_eq!(info.encode(), bytes.clone());
            prop_assert_eq!(u16::from_be_bytes([bytes[0], bytes[1]]), kind);
        }

        #[test]
        fn reply_data_never_panics_nor_allocates(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            // The parsers borrow: nothing is allocated at all.
            let (_, max) = largest_allocation(|| {
                let _ = Info::parse(&data);
                let _ = MetaContextReply::parse(&data);
                let _ = parse_rep_server(&data);
            });
            prop_assert_eq!(max, 0);
        }

        #[test]
        fn meta_contexts_round_trip(id in any::<u32>(), name in ".{0,60}") {
            let m = MetaContextReply { id, name: &name };
            let wire = m.encode();
            prop_assert_eq!(MetaContextReply::parse(&wire), Ok(m));
        }

        #[test]
        fn rep_servers_round_trip(name in ".{0,60}") {
            let wire = rep_server_data(&name);
            prop_assert_eq!(parse_rep_server(&wire), Ok((name.as_str(), "")));
        }
    }
}
