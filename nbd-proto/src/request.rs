//! Requests of the transmission phase: the 28-byte header both ways, and
//! the rules a request must meet before a server lets it reach a volume.
//!
//! [`validate`] is the one place those rules live: flags per command, the
//! payload limit, the range against the export, and which errno the client
//! gets for each refusal. It is pure so it can be tested against a model.

use crate::{
    CMD_BLOCK_STATUS, CMD_CACHE, CMD_DISC, CMD_FLAG_DF, CMD_FLAG_FAST_ZERO, CMD_FLAG_FUA,
    CMD_FLAG_NO_HOLE, CMD_FLAG_REQ_ONE, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES,
    EINVAL, ENOSPC, EOVERFLOW, EPERM, MAX_PAYLOAD, ProtoError, REQUEST_HEADER_LEN, REQUEST_MAGIC,
    be_u16, be_u32, be_u64,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
    /// A type this server does not know; answered with EINVAL.
    Unknown(u16),
}

impl Command {
    pub fn from_wire(t: u16) -> Self {
        match t {
            CMD_READ => Command::Read,
            CMD_WRITE => Command::Write,
            CMD_DISC => Command::Disc,
            CMD_FLUSH => Command::Flush,
            CMD_TRIM => Command::Trim,
            CMD_CACHE => Command::Cache,
            CMD_WRITE_ZEROES => Command::WriteZeroes,
            CMD_BLOCK_STATUS => Command::BlockStatus,
            other => Command::Unknown(other),
        }
    }

    /// The type on the wire; `Unknown(t)` is `t`, whatever it is, so a test
    /// client can send any type at all.
    pub fn to_wire(self) -> u16 {
        match self {
            Command::Read => CMD_READ,
            Command::Write => CMD_WRITE,
            Command::Disc => CMD_DISC,
            Command::Flush => CMD_FLUSH,
            Command::Trim => CMD_TRIM,
            Command::Cache => CMD_CACHE,
            Command::WriteZeroes => CMD_WRITE_ZEROES,
            Command::BlockStatus => CMD_BLOCK_STATUS,
            Command::Unknown(t) => t,
        }
    }

    /// Commands that change the export's contents.
    pub fn writes(self) -> bool {
        matches!(self, Command::Write | Command::WriteZeroes | Command::Trim)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: Command,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    pub fn parse(b: &[u8; REQUEST_HEADER_LEN]) -> Result<Self, ProtoError> {
        let magic = be_u32(&b[..4]);
        if magic != REQUEST_MAGIC {
            return Err(ProtoError::RequestMagic(magic));
        }
        Ok(Request {
            flags: be_u16(&b[4..6]),
            command: Command::from_wire(be_u16(&b[6..8])),
            cookie: be_u64(&b[8..16]),
            offset: be_u64(&b[16..24]),
            length: be_u32(&b[24..28]),
        })
    }

    /// The header on the wire; a WRITE's payload follows it.
    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut b = [0u8; REQUEST_HEADER_LEN];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_wire().to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Bytes of payload that follow this header on the wire.
    pub fn payload_len(&self) -> u32 {
        if self.command == Command::Write {
            self.length
        } else {
            0
        }
    }
}

/// Why a request's range is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeError {
    /// `offset + length` does not fit in 64 bits.
    Overflow,
    /// The range ends past the export.
    PastEnd,
}

/// Checks `[offset, offset + length)` against an export of `size` bytes.
pub fn check_range(offset: u64, length: u32, size: u64) -> Result<(), RangeError> {
    let end = offset
        .checked_add(u64::from(length))
        .ok_or(RangeError::Overflow)?;
    if end > size {
        Err(RangeError::PastEnd)
    } else {
        Ok(())
    }
}

/// What a session may do: what the client negotiated, and what the export
/// allows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionOptions {
    pub structured: bool,
    /// A metadata context was selected for this export: BLOCK_STATUS
    /// allowed.
    pub block_status: bool,
    /// The export (a snapshot) refuses WRITE, TRIM and WRITE_ZEROES with
    /// EPERM; the handshake advertised FLAG_READ_ONLY.
    pub read_only: bool,
}

/// A request refused before it reaches the volume: the errno of the reply
/// and a message for the client (structured replies carry it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub errno: u32,
    pub message: &'static str,
}

const fn refuse(errno: u32, message: &'static str) -> Result<(), Refusal> {
    Err(Refusal { errno, message })
}

/// Checks a request against the protocol, the negotiated options and an
/// export of `size` bytes. DISC never gets here (the session ends on it)
/// and is refused like an unknown command.
///
/// The order of the checks decides which errno a request that breaks
/// several rules gets: command, flags, read-only, length, range.
pub fn validate(req: &Request, size: u64, opts: SessionOptions) -> Result<(), Refusal> {
    let (allowed, max_len) = match req.command {
        Command::Read => (
            CMD_FLAG_FUA | if opts.structured { CMD_FLAG_DF } else { 0 },
            MAX_PAYLOAD,
        ),
        Command::Write => (CMD_FLAG_FUA, MAX_PAYLOAD),
        Command::WriteZeroes => (
            CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            u32::MAX,
        ),
        Command::Trim | Command::Cache | Command::Flush => (CMD_FLAG_FUA, u32::MAX),
        Command::BlockStatus => {
            if !opts.block_status {
                return refuse(EINVAL, "no metadata context was negotiated");
            }
            (CMD_FLAG_FUA | CMD_FLAG_REQ_ONE, u32::MAX)
        }
        Command::Disc | Command::Unknown(_) => return refuse(EINVAL, "unknown command"),
    };
    if req.flags & !allowed != 0 {
        return refuse(EINVAL, "command flags not valid for this command");
    }
    if opts.read_only && req.command.writes() {
        return refuse(EPERM, "the export is read-only");
    }
    if req.command == Command::Flush {
        return Ok(());
    }
    if req.length == 0 {
        return refuse(EINVAL, "zero-length request");
    }
    if req.length > max_len {
        return refuse(
            if opts.structured { EOVERFLOW } else { EINVAL },
            "request larger than the maximum payload",
        );
    }
    match check_range(req.offset, req.length, size) {
        Ok(()) => Ok(()),
        // The spec: ENOSPC for a write past the end, EINVAL for the rest.
        Err(RangeError::PastEnd)
            if matches!(req.command, Command::Write | Command::WriteZeroes) =>
        {
            refuse(ENOSPC, "write past the end of the export")
        }
        Err(RangeError::PastEnd) => refuse(EINVAL, "request past the end of the export"),
        Err(RangeError::Overflow) => refuse(EINVAL, "offset + length overflows"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn request_parse() {
        let mut b = [0u8; REQUEST_HEADER_LEN];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&CMD_FLAG_FUA.to_be_bytes());
        b[6..8].copy_from_slice(&1u16.to_be_bytes());
        b[8..16].copy_from_slice(&7u64.to_be_bytes());
        b[16..24].copy_from_slice(&4096u64.to_be_bytes());
        b[24..].copy_from_slice(&512u32.to_be_bytes());
        let r = Request::parse(&b).unwrap();
        assert_eq!(r.command, Command::Write);
        assert_eq!(
            (r.flags, r.cookie, r.offset, r.length, r.payload_len()),
            (CMD_FLAG_FUA, 7, 4096, 512, 512)
        );
        b[0] = 0;
        assert!(matches!(
            Request::parse(&b),
            Err(ProtoError::RequestMagic(_))
        ));
        assert_eq!(Command::from_wire(99), Command::Unknown(99));
    }

    #[test]
    fn range_edges() {
        assert_eq!(check_range(0, 512, 512), Ok(()));
        assert_eq!(check_range(512, 0, 512), Ok(()));
        assert_eq!(check_range(1, 512, 512), Err(RangeError::PastEnd));
        assert_eq!(
            check_range(u64::MAX, 1, u64::MAX),
            Err(RangeError::Overflow)
        );
        assert_eq!(check_range(u64::MAX - 1, 1, u64::MAX), Ok(()));
        assert_eq!(check_range(u64::MAX, 0, 512), Err(RangeError::PastEnd));
    }

    fn req(command: Command, flags: u16, offset: u64, length: u32) -> Request {
        Request {
            flags,
            command,
            cookie: 1,
            offset,
            length,
        }
    }

    fn errno(r: Result<(), Refusal>) -> Option<u32> {
        r.err().map(|e| e.errno)
    }

    const STRUCTURED: SessionOptions = SessionOptions {
        structured: true,
        block_status: true,
        read_only: false,
    };

    #[test]
    fn validation_cases() {
        let simple = SessionOptions::default();
        let size = 1 << 20;
        let v = |r: Request, o| errno(validate(&r, size, o));
        assert_eq!(v(req(Command::Read, 0, 0, 4096), simple), None);
        assert_eq!(
            v(req(Command::Read, CMD_FLAG_DF, 0, 4096), simple),
            Some(EINVAL)
        );
        assert_eq!(
            v(req(Command::Read, CMD_FLAG_DF, 0, 4096), STRUCTURED),
            None
        );
        assert_eq!(v(req(Command::Read, 0, size, 1), simple), Some(EINVAL));
        assert_eq!(v(req(Command::Write, 0, size, 1), simple), Some(ENOSPC));
        assert_eq!(
            v(req(Command::WriteZeroes, 0, size - 1, 2), simple),
            Some(ENOSPC)
        );
        assert_eq!(v(req(Command::Trim, 0, size - 1, 2), simple), Some(EINVAL));
        assert_eq!(v(req(Command::Read, 0, u64::MAX, 1), simple), Some(EINVAL));
        assert_eq!(v(req(Command::Write, 0, u64::MAX, 1), simple), Some(EINVAL));
        assert_eq!(v(req(Command::Read, 0, 0, 0), simple), Some(EINVAL));
        assert_eq!(v(req(Command::Flush, 0, u64::MAX, u32::MAX), simple), None);
        assert_eq!(
            v(req(Command::Flush, CMD_FLAG_NO_HOLE, 0, 0), simple),
            Some(EINVAL)
        );
        let big = MAX_PAYLOAD + 1;
        assert_eq!(v(req(Command::Read, 0, 0, big), simple), Some(EINVAL));
        assert_eq!(
            v(req(Command::Read, 0, 0, big), STRUCTURED),
            Some(EOVERFLOW)
        );
        assert_eq!(v(req(Command::Trim, 0, 0, big), simple), Some(EINVAL)); // past the end
        assert_eq!(v(req(Command::Trim, 0, 0, big), STRUCTURED), Some(EINVAL));
        assert_eq!(
            errno(validate(
                &req(Command::Trim, 0, 0, u32::MAX),
                u64::MAX,
                simple
            )),
            None
        );
        assert_eq!(
            v(req(Command::BlockStatus, 0, 0, 512), simple),
            Some(EINVAL)
        );
        assert_eq!(
            v(
                req(Command::BlockStatus, CMD_FLAG_REQ_ONE, 0, 512),
                STRUCTURED
            ),
            None
        );
        assert_eq!(v(req(Command::Disc, 0, 0, 0), STRUCTURED), Some(EINVAL));
        assert_eq!(
            v(req(Command::Unknown(42), 0, 0, 1), STRUCTURED),
            Some(EINVAL)
        );
    }

    #[test]
    fn read_only_refuses_writes_only() {
        let ro = SessionOptions {
            read_only: true,
            ..STRUCTURED
        };
        let size = 1 << 20;
        for cmd in [Command::Write, Command::Trim, Command::WriteZeroes] {
            let r = validate(&req(cmd, 0, 0, 512), size, ro);
            assert_eq!(r.err().map(|e| e.errno), Some(EPERM), "{cmd:?}");
        }
        for cmd in [Command::Read, Command::Cache, Command::BlockStatus] {
            assert_eq!(validate(&req(cmd, 0, 0, 512), size, ro), Ok(()), "{cmd:?}");
        }
        assert_eq!(validate(&req(Command::Flush, 0, 0, 0), size, ro), Ok(()));
    }

    /// The rules of `validate` restated plainly, with the range done in
    /// u128 so nothing can overflow: the errno, or None to accept.
    fn model(r: &Request, size: u64, o: SessionOptions) -> Option<u32> {
        use Command::*;
        let flags: u16 = match r.command {
            Read if o.structured => 0b00101,
            Read | Write | Trim | Cache | Flush => 0b00001,
            WriteZeroes => 0b10011,
            BlockStatus if o.block_status => 0b01001,
            BlockStatus | Disc | Unknown(_) => return Some(EINVAL),
        };
        if r.flags & !flags != 0 {
            return Some(EINVAL);
        }
        if o.read_only && matches!(r.command, Write | Trim | WriteZeroes) {
            return Some(EPERM);
        }
        if r.command == Flush {
            return None;
        }
        if r.length == 0 {
            return Some(EINVAL);
        }
        if matches!(r.command, Read | Write) && r.length > 32 * 1024 * 1024 {
            return Some(if o.structured { EOVERFLOW } else { EINVAL });
        }
        let end = u128::from(r.offset) + u128::from(r.length);
        if end > u128::from(u64::MAX) {
            Some(EINVAL)
        } else if end > u128::from(size) {
            Some(if matches!(r.command, Write | WriteZeroes) {
                ENOSPC
            } else {
                EINVAL
            })
        } else {
            None
        }
    }

    /// Values near the edges (0, the export size, u64::MAX) more often than
    /// uniformly random ones would be.
    fn edgy_u64() -> impl Strategy<Value = u64> {
        prop_oneof![
            any::<u64>(),
            0u64..4096,
            (u64::MAX - 4096)..=u64::MAX,
            (0u64..3).prop_map(|k| (1u64 << 20) - 1 + k),
        ]
    }

    fn edgy_u32() -> impl Strategy<Value = u32> {
        prop_oneof![
            any::<u32>(),
            0u32..4,
            (MAX_PAYLOAD - 2)..=(MAX_PAYLOAD + 2),
            (u32::MAX - 2)..=u32::MAX,
        ]
    }

    fn arb_request() -> impl Strategy<Value = Request> {
        (
            prop_oneof![4 => 0u16..8, 1 => any::<u16>()],
            prop_oneof![2 => Just(0u16), 2 => 0u16..0x20, 1 => any::<u16>()],
            edgy_u64(),
            edgy_u32(),
        )
            .prop_map(|(cmd, flags, offset, length)| Request {
                flags,
                command: Command::from_wire(cmd),
                cookie: 0,
                offset,
                length,
            })
    }

    proptest! {
        // Validation is cheap: enough cases to reach every rule often.
        #![proptest_config(ProptestConfig::with_cases(4096))]

        #[test]
        fn headers_never_panic(b in proptest::array::uniform28(any::<u8>())) {
            let _ = Request::parse(&b);
        }

        #[test]
        fn headers_round_trip(mut b in proptest::array::uniform28(any::<u8>())) {
            b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
            let r = Request::parse(&b).unwrap();
            prop_assert_eq!(r.encode(), b);
            prop_assert_eq!(Request::parse(&r.encode()), Ok(r));
        }

        #[test]
        fn range_check_agrees_with_wide_arithmetic(off in any::<u64>(), len in any::<u32>(), size in any::<u64>()) {
            let end = off as u128 + len as u128;
            let ok = end <= size as u128;
            prop_assert_eq!(check_range(off, len, size).is_ok(), ok);
        }

        #[test]
        fn validate_agrees_with_the_model(
            r in arb_request(),
            size in prop_oneof![edgy_u64(), Just(1u64 << 20)],
            structured in any::<bool>(),
            block_status in any::<bool>(),
            read_only in any::<bool>(),
        ) {
            // base:allocation can only be selected with structured replies.
            let o = SessionOptions { structured, block_status: structured && block_status, read_only };
            let got = validate(&r, size, o);
            prop_assert_eq!(got.err().map(|e| e.errno), model(&r, size, o));
            if let Err(e) = got {
                prop_assert!(!e.message.is_empty());
            }
        }

        #[test]
        fn accepted_requests_are_in_range_and_within_the_payload(
            r in arb_request(), size in edgy_u64(), structured in any::<bool>(),
        ) {
            let o = SessionOptions { structured, block_status: structured, read_only: false };
            if validate(&r, size, o).is_ok() && r.command != Command::Flush {
                prop_assert!(u128::from(r.offset) + u128::from(r.length) <= u128::from(size));
                prop_assert!(r.length > 0);
                if matches!(r.command, Command::Read | Command::Write) {
                    prop_assert!(r.length <= MAX_PAYLOAD);
                }
            }
        }
    }
}
