//! Verifying AWS Signature Version 4, in the header form (`Authorization:
//! AWS4-HMAC-SHA256 Credential=..., SignedHeaders=..., Signature=...`) and
//! the query-string form (`X-Amz-Algorithm=...&X-Amz-Signature=...`).
//!
//! The canonical request is rebuilt from the request as it arrived: method,
//! the path URI-encoded once more (the double encoding every service but S3
//! uses), the query re-encoded and sorted, exactly the headers the client
//! named in `SignedHeaders`, and the payload hash. `aws-sigv4` signs
//! requests but cannot be told to sign exactly the header set a client
//! chose, so verifying needs this reconstruction; the unit tests sign with
//! `aws-sigv4` and with AWS's documented example to check it.
//!
//! The signature is compared with `ring::hmac::verify`, in constant time.
//! Pure: no I/O; the caller passes the clock.

use ring::{digest, hmac};
use snapshot::hash::hex;

use super::credentials::{Credential, Credentials};

pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";
/// How far a request's date may be from ours, either way: AWS's limit
/// ("within 15 minutes of the AWS timestamp"), after which EC2 answers
/// `RequestExpired`.
pub const MAX_SKEW_SECS: i64 = 15 * 60;
/// The longest a presigned URL may be valid (seven days, as AWS).
pub const MAX_EXPIRES_SECS: i64 = 7 * 24 * 3600;
/// The payload hash a client may send instead of the body's, where the
/// body is checked some other way (PutSnapshotBlock's signed checksum).
pub const UNSIGNED_PAYLOAD: &str = "UNSIGNED-PAYLOAD";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("request is not signed")]
    Missing,
    #[error("malformed signature: {0}")]
    Malformed(String),
    #[error("the access key {0} is not known")]
    UnknownKey(String),
    #[error("{0}")]
    Scope(String),
    #[error("{0}")]
    Expired(String),
    #[error(
        "the request signature we calculated does not match the signature you provided; check your key and signing method"
    )]
    Mismatch,
    #[error("the x-amz-content-sha256 header does not match the body")]
    PayloadHash,
}

/// A request as it arrived, for verification.
pub struct Request<'a> {
    pub method: &'a str,
    /// The path as sent, still percent-encoded.
    pub path: &'a str,
    /// The raw query string, without `?`.
    pub query: &'a str,
    /// Header names lowercase, in arrival order; repeated names allowed.
    pub headers: &'a [(String, String)],
    /// Hex SHA-256 of the body.
    pub body_sha256: &'a str,
    /// Whether `x-amz-content-sha256: UNSIGNED-PAYLOAD` is acceptable here.
    pub allow_unsigned_payload: bool,
}

/// Who signed, once verified.
#[derive(Debug)]
pub struct Verified<'c> {
    pub credential: &'c Credential,
}

/// Verifies `req` for `region` and `service` at `now` (Unix seconds).
pub fn verify<'c>(
    req: &Request<'_>,
    creds: &'c Credentials,
    region: &str,
    service: &str,
    now: i64,
) -> Result<Verified<'c>, AuthError> {
    let query = parse_query(req.query)?;
    let auth = header(req.headers, "authorization");
    let presigned = query.iter().any(|(k, _)| k == "X-Amz-Algorithm");
    let parts = match (auth, presigned) {
        (Some(_), true) => {
            return Err(AuthError::Malformed(
                "both an Authorization header and X-Amz-Algorithm".into(),
            ));
        }
        (Some(a), false) => header_parts(a, req.headers)?,
        (None, true) => query_parts(&query, now)?,
        (None, false) => return Err(AuthError::Missing),
    };
    let scope = Scope::parse(&parts.credential)?;
    let credential = creds
        .get(&scope.access_key_id)
        .ok_or_else(|| AuthError::UnknownKey(scope.access_key_id.clone()))?;
    if scope.region != region {
        return Err(AuthError::Scope(format!(
            "credential should be scoped to a valid region, not '{}'",
            scope.region
        )));
    }
    if scope.service != service {
        return Err(AuthError::Scope(format!(
            "credential should be scoped to correct service: '{service}', not '{}'",
            scope.service
        )));
    }
    if scope.terminator != "aws4_request" {
        return Err(AuthError::Scope(
            "credential should be scoped with a valid terminator: 'aws4_request'".into(),
        ));
    }
    if !parts.date.starts_with(&scope.date) || scope.date.len() != 8 {
        return Err(AuthError::Scope(format!(
            "date in credential scope {} does not match the request date {}",
            scope.date, parts.date
        )));
    }
    let signed_at = parse_amz_date(&parts.date)
        .ok_or_else(|| AuthError::Malformed(format!("invalid date {:?}", parts.date)))?;
    match parts.expires {
        None => {
            if (now - signed_at).abs() > MAX_SKEW_SECS {
                return Err(AuthError::Expired(format!(
                    "request has expired: signed at {} and the server's time is {}",
                    parts.date,
                    format_amz_date(now)
                )));
            }
        }
        Some(expires) => {
            if signed_at - now > MAX_SKEW_SECS {
                return Err(AuthError::Expired(format!(
                    "request is not yet valid: signed at {}",
                    parts.date
                )));
            }
            if now > signed_at.saturating_add(expires) {
                return Err(AuthError::Expired(format!(
                    "request has expired: signed at {} for {expires} seconds",
                    parts.date
                )));
            }
        }
    }
    let key = signing_key(&credential.secret, &scope.date, region, service);
    let provided = hex_decode(&parts.signature)
        .ok_or_else(|| AuthError::Malformed("signature is not 64 hex digits".into()))?;
    for payload in payload_hashes(req)? {
        let canonical = canonical_request(
            req,
            &query,
            &parts.signed_headers,
            &payload,
            parts.presigned,
        )?;
        let to_sign = string_to_sign(&parts.date, &scope, &canonical);
        if hmac::verify(&key, to_sign.as_bytes(), &provided).is_ok() {
            return Ok(Verified { credential });
        }
    }
    Err(AuthError::Mismatch)
}

/// What the header or query names.
struct Parts {
    credential: String,
    signed_headers: Vec<String>,
    signature: String,
    date: String,
    /// Presigned: valid for this many seconds from `date`.
    expires: Option<i64>,
    presigned: bool,
}

fn header<'h>(headers: &'h [(String, String)], name: &str) -> Option<&'h str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn header_parts(auth: &str, headers: &[(String, String)]) -> Result<Parts, AuthError> {
    let rest = auth
        .strip_prefix(ALGORITHM)
        .filter(|r| r.starts_with(' '))
        .ok_or_else(|| AuthError::Malformed(format!("algorithm must be {ALGORITHM}")))?;
    let (mut credential, mut signed, mut signature) = (None, None, None);
    for field in rest.split(',') {
        let Some((k, v)) = field.trim().split_once('=') else {
            return Err(AuthError::Malformed(format!(
                "bad field {:?}",
                field.trim()
            )));
        };
        match k {
            "Credential" => credential = Some(v.to_owned()),
            "SignedHeaders" => signed = Some(v.to_owned()),
            "Signature" => signature = Some(v.to_owned()),
            _ => {}
        }
    }
    let missing = |what: &str| AuthError::Malformed(format!("Authorization header lacks {what}"));
    let signed_headers = split_signed(&signed.ok_or_else(|| missing("SignedHeaders"))?)?;
    if !signed_headers.iter().any(|h| h == "x-amz-date") {
        return Err(AuthError::Malformed(
            "x-amz-date must be a signed header".into(),
        ));
    }
    let date = header(headers, "x-amz-date")
        .ok_or_else(|| AuthError::Malformed("the x-amz-date header is missing".into()))?
        .to_owned();
    Ok(Parts {
        credential: credential.ok_or_else(|| missing("Credential"))?,
        signed_headers,
        signature: signature.ok_or_else(|| missing("Signature"))?,
        date,
        expires: None,
        presigned: false,
    })
}

fn query_parts(query: &[(String, String)], _now: i64) -> Result<Parts, AuthError> {
    let get = |k: &str| {
        query
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .ok_or_else(|| AuthError::Malformed(format!("query lacks {k}")))
    };
    if get("X-Amz-Algorithm")? != ALGORITHM {
        return Err(AuthError::Malformed(format!(
            "X-Amz-Algorithm must be {ALGORITHM}"
        )));
    }
    let expires: i64 = get("X-Amz-Expires")?
        .parse()
        .ok()
        .filter(|e| (1..=MAX_EXPIRES_SECS).contains(e))
        .ok_or_else(|| {
            AuthError::Malformed(format!(
                "X-Amz-Expires must be 1 to {MAX_EXPIRES_SECS} seconds"
            ))
        })?;
    Ok(Parts {
        credential: get("X-Amz-Credential")?,
        signed_headers: split_signed(&get("X-Amz-SignedHeaders")?)?,
        signature: get("X-Amz-Signature")?,
        date: get("X-Amz-Date")?,
        expires: Some(expires),
        presigned: true,
    })
}

/// `host;x-amz-date`: lowercase, sorted, no repeats, and `host` among them.
fn split_signed(s: &str) -> Result<Vec<String>, AuthError> {
    let names: Vec<String> = s.split(';').map(str::to_owned).collect();
    let sorted = names.windows(2).all(|w| w[0] < w[1]);
    let lower = names
        .iter()
        .all(|n| !n.is_empty() && !n.bytes().any(|b| b.is_ascii_uppercase()));
    if !sorted || !lower {
        return Err(AuthError::Malformed(
            "SignedHeaders must be lowercase, sorted and without repeats".into(),
        ));
    }
    if !names.iter().any(|n| n == "host") {
        return Err(AuthError::Malformed("host must be a signed header".into()));
    }
    Ok(names)
}

struct Scope {
    access_key_id: String,
    date: String,
    region: String,
    service: String,
    terminator: String,
}

impl Scope {
    fn parse(s: &str) -> Result<Self, AuthError> {
        let parts: Vec<&str> = s.split('/').collect();
        let [id, date, region, service, terminator] = parts[..] else {
            return Err(AuthError::Malformed(format!(
                "credential {s:?} is not KEY/DATE/REGION/SERVICE/aws4_request"
            )));
        };
        Ok(Scope {
            access_key_id: id.to_owned(),
            date: date.to_owned(),
            region: region.to_owned(),
            service: service.to_owned(),
            terminator: terminator.to_owned(),
        })
    }

    fn string(&self) -> String {
        format!(
            "{}/{}/{}/{}",
            self.date, self.region, self.service, self.terminator
        )
    }
}

/// The payload hashes the signature may have been made with: the header's
/// when given (checked against the body), else the body's, and where an
/// unsigned payload is acceptable also `UNSIGNED-PAYLOAD` (botocore signs
/// so over HTTPS without sending the header).
fn payload_hashes(req: &Request<'_>) -> Result<Vec<String>, AuthError> {
    match header(req.headers, "x-amz-content-sha256") {
        Some(UNSIGNED_PAYLOAD) if req.allow_unsigned_payload => Ok(vec![UNSIGNED_PAYLOAD.into()]),
        Some(h) if h.eq_ignore_ascii_case(req.body_sha256) => Ok(vec![h.to_owned()]),
        Some(_) => Err(AuthError::PayloadHash),
        None if req.allow_unsigned_payload => {
            Ok(vec![req.body_sha256.to_owned(), UNSIGNED_PAYLOAD.into()])
        }
        None => Ok(vec![req.body_sha256.to_owned()]),
    }
}

fn canonical_request(
    req: &Request<'_>,
    query: &[(String, String)],
    signed: &[String],
    payload: &str,
    presigned: bool,
) -> Result<String, AuthError> {
    let mut out = String::with_capacity(512);
    out.push_str(req.method);
    out.push('\n');
    out.push_str(&canonical_uri(req.path));
    out.push('\n');
    let mut pairs: Vec<(String, String)> = query
        .iter()
        .filter(|(k, _)| !(presigned && k == "X-Amz-Signature"))
        .map(|(k, v)| {
            (
                uri_encode(k.as_bytes(), true),
                uri_encode(v.as_bytes(), true),
            )
        })
        .collect();
    pairs.sort();
    let q: Vec<String> = pairs.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
    out.push_str(&q.join("&"));
    out.push('\n');
    for name in signed {
        let values: Vec<String> = req
            .headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        if values.is_empty() {
            return Err(AuthError::Malformed(format!(
                "signed header {name} is not in the request"
            )));
        }
        out.push_str(name);
        out.push(':');
        out.push_str(&values.join(","));
        out.push('\n');
    }
    out.push('\n');
    out.push_str(&signed.join(";"));
    out.push('\n');
    out.push_str(payload);
    Ok(out)
}

/// The path URI-encoded once more: `%` becomes `%25`, so a client that
/// encoded the path and then the canonical URI agrees with us.
fn canonical_uri(path: &str) -> String {
    if path.is_empty() {
        return "/".into();
    }
    uri_encode(path.as_bytes(), false)
}

fn string_to_sign(date: &str, scope: &Scope, canonical: &str) -> String {
    let hash = digest::digest(&digest::SHA256, canonical.as_bytes());
    format!(
        "{ALGORITHM}\n{date}\n{}\n{}",
        scope.string(),
        hex(hash.as_ref())
    )
}

/// kSigning = HMAC(HMAC(HMAC(HMAC("AWS4" + secret, date), region), service), "aws4_request").
pub fn signing_key(secret: &str, date: &str, region: &str, service: &str) -> hmac::Key {
    let mac = |key: &[u8], data: &str| {
        hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data.as_bytes())
    };
    let k = mac(format!("AWS4{secret}").as_bytes(), date);
    let k = mac(k.as_ref(), region);
    let k = mac(k.as_ref(), service);
    let k = mac(k.as_ref(), "aws4_request");
    hmac::Key::new(hmac::HMAC_SHA256, k.as_ref())
}

/// Splits a raw query into decoded pairs; `+` stays a plus (SigV4 clients
/// encode spaces as `%20`).
pub fn parse_query(q: &str) -> Result<Vec<(String, String)>, AuthError> {
    if q.is_empty() {
        return Ok(Vec::new());
    }
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let dec = |s: &str| {
                percent_decode(s)
                    .and_then(|b| String::from_utf8(b).ok())
                    .ok_or_else(|| AuthError::Malformed(format!("bad escape in query {s:?}")))
            };
            Ok((dec(k)?, dec(v)?))
        })
        .collect()
}

pub fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hi = (*b.get(i + 1)? as char).to_digit(16)?;
            let lo = (*b.get(i + 2)? as char).to_digit(16)?;
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

/// SigV4's URI encoding: unreserved characters stay, everything else is
/// `%XX` uppercase; `/` stays too unless `slash` is set.
pub fn uri_encode(bytes: &[u8], slash: bool) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        let keep = b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'_' | b'.' | b'~')
            || (b == b'/' && !slash);
        if keep {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if s.len() != 64 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

pub fn sha256_hex(body: &[u8]) -> String {
    hex(digest::digest(&digest::SHA256, body).as_ref())
}

/// `YYYYMMDDTHHMMSSZ` to Unix seconds.
pub fn parse_amz_date(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    let (y, mo, d) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (h, mi, se) = (num(9..11)?, num(11..13)?, num(13..15)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    Some(days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + se)
}

/// Unix seconds as `YYYYMMDDTHHMMSSZ`.
pub fn format_amz_date(t: i64) -> String {
    let (days, secs) = (t.div_euclid(86400), t.rem_euclid(86400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

// Howard Hinnant's days-from-civil and its inverse (proleptic Gregorian).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

pub fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
#[path = "sigv4_tests.rs"]
mod tests;
