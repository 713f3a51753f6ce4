//! Option requests of the handshake: the 16-byte header, and the data of
//! the options that carry structure (NBD_OPT_INFO and NBD_OPT_GO, the two
//! meta-context options). The parsers' errors are messages for
//! NBD_REP_ERR_INVALID: the option is refused and haggling goes on.

use crate::{
    EncodeError, IHAVEOPT, MAX_STRING, OPTION_HEADER_LEN, ProtoError, Reader, be_u32, be_u64,
    fit_u16, fit_u32, put_string,
};

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

    pub fn encode(&self) -> [u8; OPTION_HEADER_LEN] {
        let mut b = [0u8; OPTION_HEADER_LEN];
        b[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[8..12].copy_from_slice(&self.option.to_be_bytes());
        b[12..].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// A whole option request, header and data, appended to `out`.
pub fn encode_option(out: &mut Vec<u8>, option: u32, data: &[u8]) -> Result<(), EncodeError> {
    let length = fit_u32("option data", data.len())?;
    out.extend_from_slice(&OptionHeader { option, length }.encode());
    out.extend_from_slice(data);
    Ok(())
}

/// Data of NBD_OPT_INFO and NBD_OPT_GO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub requests: Vec<u16>,
}

impl InfoRequest {
    /// u32 name length, name, u16 count, u16 each.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        let mut d = Vec::with_capacity(6 + self.name.len() + 2 * self.requests.len());
        put_string(&mut d, "export name", &self.name)?;
        d.extend_from_slice(&fit_u16("info requests", self.requests.len())?.to_be_bytes());
        for r in &self.requests {
            d.extend_from_slice(&r.to_be_bytes());
        }
        Ok(d)
    }
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

impl MetaRequest {
    /// u32 name length, name, u32 query count, each query as u32 length
    /// and string.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        let mut d = Vec::new();
        put_string(&mut d, "export name", &self.name)?;
        d.extend_from_slice(&fit_u32("queries", self.queries.len())?.to_be_bytes());
        for q in &self.queries {
            put_string(&mut d, "query", q)?;
        }
        Ok(d)
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alloc_probe::largest_allocation;
    use crate::{INFO_BLOCK_SIZE, INFO_NAME};
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

    #[test]
    fn option_bytes() {
        let mut out = Vec::new();
        encode_option(&mut out, 7, b"xy").unwrap();
        assert_eq!(&out[..8], b"IHAVEOPT");
        assert_eq!(&out[8..], &[0, 0, 0, 7, 0, 0, 0, 2, b'x', b'y']);
        let h = OptionHeader::parse(out[..16].try_into().unwrap()).unwrap();
        assert_eq!(
            h,
            OptionHeader {
                option: 7,
                length: 2
            }
        );
        let too_many = InfoRequest {
            name: String::new(),
            requests: vec![0; 1 << 16],
        };
        assert!(matches!(
            too_many.encode(),
            Err(EncodeError::TooLong { .. })
        ));
    }

    proptest! {
        #[test]
        fn meta_request_never_panics(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let (_, max) = largest_allocation(|| parse_meta_request(&data));
            // Each query string is no longer than the data, and the list of
            // them has at most one slot per four bytes.
            prop_assert!(max <= data.len().max(data.len() / 4 * size_of::<String>()));
        }

        #[test]
        fn meta_request_round_trips(name in "[a-z]{0,20}", qs in proptest::collection::vec("[a-z:]{0,30}", 0..8)) {
            let refs: Vec<&str> = qs.iter().map(String::as_str).collect();
            let wire = meta_data(&name, &refs);
            let want = MetaRequest { name, queries: qs.clone() };
            prop_assert_eq!(want.encode().unwrap(), wire.clone());
            let parsed = parse_meta_request(&wire).unwrap();
            prop_assert_eq!(parsed, want);
        }

        #[test]
        fn info_request_never_panics(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let (_, max) = largest_allocation(|| parse_info_request(&data));
            prop_assert!(max <= data.len());
        }

        #[test]
        fn info_request_round_trips(name in "[a-z0-9._-]{0,64}", reqs in proptest::collection::vec(any::<u16>(), 0..20)) {
            let want = InfoRequest { name, requests: reqs };
            prop_assert_eq!(want.encode().unwrap(), info_data(&want.name, &want.requests));
            let parsed = parse_info_request(&info_data(&want.name, &want.requests)).unwrap();
            prop_assert_eq!(parsed, want);
        }

        #[test]
        fn option_headers_never_panic(h in proptest::array::uniform16(any::<u8>())) {
            let _ = OptionHeader::parse(&h);
        }

        #[test]
        fn option_headers_round_trip(option in any::<u32>(), length in any::<u32>()) {
            let h = OptionHeader { option, length };
            prop_assert_eq!(OptionHeader::parse(&h.encode()), Ok(h));
        }
    }
}
