//! The handshake's messages outside option haggling: the server's greeting,
//! the client's flags, and the server's reply to NBD_OPT_EXPORT_NAME (the
//! one option answered without an option reply).

use crate::{
    EXPORT_NAME_PADDING, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES, GREETING_LEN, IHAVEOPT, NBDMAGIC, ProtoError, be_u16, be_u64,
};

/// The fixed-newstyle greeting: NBDMAGIC, IHAVEOPT, handshake flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Greeting {
    pub flags: u16,
}

impl Greeting {
    pub fn encode(&self) -> [u8; GREETING_LEN] {
        let mut b = [0u8; GREETING_LEN];
        b[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
        b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[16..].copy_from_slice(&self.flags.to_be_bytes());
        b
    }

    /// A newstyle greeting; anything else (oldstyle included) is refused.
    pub fn parse(b: &[u8; GREETING_LEN]) -> Result<Self, ProtoError> {
        let (magic, ihaveopt) = (be_u64(&b[..8]), be_u64(&b[8..16]));
        if magic != NBDMAGIC || ihaveopt != IHAVEOPT {
            return Err(ProtoError::Greeting { magic, ihaveopt });
        }
        Ok(Greeting {
            flags: be_u16(&b[16..]),
        })
    }

    pub fn fixed_newstyle(&self) -> bool {
        self.flags & FLAG_FIXED_NEWSTYLE != 0
    }

    pub fn no_zeroes(&self) -> bool {
        self.flags & FLAG_NO_ZEROES != 0
    }
}

/// Our server's greeting: fixed newstyle, and the padding after
/// NBD_OPT_EXPORT_NAME's reply may be left out.
pub fn encode_greeting() -> [u8; GREETING_LEN] {
    Greeting {
        flags: FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
    }
    .encode()
}

/// Client flags, after checking that no unknown bit is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    pub fixed_newstyle: bool,
    pub no_zeroes: bool,
}

impl ClientFlags {
    pub fn to_wire(self) -> u32 {
        let mut f = 0;
        if self.fixed_newstyle {
            f |= FLAG_C_FIXED_NEWSTYLE;
        }
        if self.no_zeroes {
            f |= FLAG_C_NO_ZEROES;
        }
        f
    }
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

/// Reply to NBD_OPT_EXPORT_NAME: size, flags, and 124 zero bytes unless the
/// client negotiated NO_ZEROES.
pub fn encode_export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut d = Vec::with_capacity(10 + EXPORT_NAME_PADDING);
    d.extend_from_slice(&size.to_be_bytes());
    d.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        d.extend_from_slice(&[0u8; EXPORT_NAME_PADDING]);
    }
    d
}

/// The export's size and transmission flags from NBD_OPT_EXPORT_NAME's
/// reply, with or without its padding.
pub fn parse_export_name_reply(b: &[u8]) -> Result<(u64, u16), ProtoError> {
    if b.len() != 10 && b.len() != 10 + EXPORT_NAME_PADDING {
        return Err(ProtoError::Length {
            what: "export name reply",
            len: b.len(),
        });
    }
    Ok((be_u64(&b[..8]), be_u16(&b[8..10])))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn greeting_bytes() {
        let g = encode_greeting();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..], &[0, 3]);
        let parsed = Greeting::parse(&g).unwrap();
        assert!(parsed.fixed_newstyle() && parsed.no_zeroes());
        let mut old = g;
        old[8..16].copy_from_slice(&0x0000_4202_8186_1253u64.to_be_bytes());
        assert!(matches!(
            Greeting::parse(&old),
            Err(ProtoError::Greeting { .. })
        ));
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
    fn export_name_reply() {
        let r = encode_export_name_reply(1 << 20, 0x1234, false);
        assert_eq!(r.len(), 134);
        assert_eq!(parse_export_name_reply(&r), Ok((1 << 20, 0x1234)));
        let r = encode_export_name_reply(5, 1, true);
        assert_eq!(r.len(), 10);
        assert_eq!(parse_export_name_reply(&r), Ok((5, 1)));
        assert!(parse_export_name_reply(&r[..9]).is_err());
    }

    proptest! {
        #[test]
        fn greetings_round_trip(flags in any::<u16>()) {
            let g = Greeting { flags };
            prop_assert_eq!(Greeting::parse(&g.encode()), Ok(g));
        }

        #[test]
        fn greetings_never_panic(b in any::<[u8; GREETING_LEN]>()) {
            let _ = Greeting::parse(&b);
        }

        #[test]
        fn client_flags_round_trip(flags in any::<u32>()) {
            if let Ok(f) = parse_client_flags(flags) {
                prop_assert_eq!(f.to_wire(), flags);
            } else {
                prop_assert!(flags > 3);
            }
        }

        #[test]
        fn export_name_replies_round_trip(size in any::<u64>(), flags in any::<u16>(), nz in any::<bool>()) {
            let r = encode_export_name_reply(size, flags, nz);
            prop_assert_eq!(parse_export_name_reply(&r), Ok((size, flags)));
        }

        #[test]
        fn export_name_replies_never_panic(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_export_name_reply(&b);
        }
    }
}
