//! Unit tests of SigV4 verification: AWS's documented example, requests
//! signed by the `aws-sigv4` crate in both forms, tampering, expiry, and
//! arbitrary input.

use super::*;
use proptest::prelude::*;

const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
const EMPTY_SHA: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

fn creds() -> Credentials {
    Credentials::parse(&format!(
        "[default]\naws_access_key_id = AKIDEXAMPLE\naws_secret_access_key = {SECRET}\n"
    ))
    .unwrap()
}

fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// AWS's documented example (the IAM ListUsers request of the SigV4
/// reference): the signature is the one AWS publishes.
#[test]
fn aws_documented_example_verifies() {
    let headers = h(&[
        ("host", "iam.amazonaws.com"),
        (
            "content-type",
            "application/x-www-form-urlencoded; charset=utf-8",
        ),
        ("x-amz-date", "20150830T123600Z"),
        (
            "authorization",
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/iam/aws4_request, SignedHeaders=content-type;host;x-amz-date, Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7",
        ),
    ]);
    let req = Request {
        method: "GET",
        path: "/",
        query: "Action=ListUsers&Version=2010-05-08",
        headers: &headers,
        body_sha256: EMPTY_SHA,
        allow_unsigned_payload: false,
    };
    let now = parse_amz_date("20150830T123600Z").unwrap();
    let c = creds();
    verify(&req, &c, "us-east-1", "iam", now).unwrap();
    // Each part the signature covers, changed, fails.
    let tampered = Request {
        query: "Action=ListUsers&Version=2010-05-09",
        ..req
    };
    assert_eq!(
        verify(&tampered, &c, "us-east-1", "iam", now).unwrap_err(),
        AuthError::Mismatch
    );
    let other_body = Request {
        body_sha256: &sha256_hex(b"x"),
        ..req
    };
    assert_eq!(
        verify(&other_body, &c, "us-east-1", "iam", now).unwrap_err(),
        AuthError::Mismatch
    );
    assert!(matches!(
        verify(&req, &c, "eu-west-1", "iam", now),
        Err(AuthError::Scope(_))
    ));
    assert!(matches!(
        verify(&req, &c, "us-east-1", "ec2", now),
        Err(AuthError::Scope(_))
    ));
    assert!(matches!(
        verify(&req, &c, "us-east-1", "iam", now + 20 * 60),
        Err(AuthError::Expired(_))
    ));
    assert!(matches!(
        verify(&req, &c, "us-east-1", "iam", now - 20 * 60),
        Err(AuthError::Expired(_))
    ));
    assert!(verify(&req, &c, "us-east-1", "iam", now + 14 * 60).is_ok());
    let wrong =
        Credentials::parse("[d]\naws_access_key_id = AKIDEXAMPLE\naws_secret_access_key = nope\n")
            .unwrap();
    assert_eq!(
        verify(&req, &wrong, "us-east-1", "iam", now).unwrap_err(),
        AuthError::Mismatch
    );
    let unknown =
        Credentials::parse("[d]\naws_access_key_id = OTHER\naws_secret_access_key = x\n").unwrap();
    assert!(matches!(
        verify(&req, &unknown, "us-east-1", "iam", now),
        Err(AuthError::UnknownKey(_))
    ));
}

#[test]
fn unsigned_and_malformed() {
    let c = creds();
    let headers = h(&[("host", "x")]);
    let req = Request {
        method: "GET",
        path: "/",
        query: "",
        headers: &headers,
        body_sha256: EMPTY_SHA,
        allow_unsigned_payload: false,
    };
    assert_eq!(
        verify(&req, &c, "us-east-1", "ec2", 0).unwrap_err(),
        AuthError::Missing
    );
    for auth in [
        "AWS4-HMAC-SHA1 Credential=a/b/c/d/e",
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/ec2/aws4_request",
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/ec2/aws4_request, SignedHeaders=x-amz-date;host, Signature=00",
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE, SignedHeaders=host;x-amz-date, Signature=00",
        "AWS4-HMAC-SHA256garbage",
    ] {
        let headers = h(&[
            ("host", "x"),
            ("x-amz-date", "20150830T123600Z"),
            ("authorization", auth),
        ]);
        let req = Request {
            headers: &headers,
            ..req
        };
        let now = parse_amz_date("20150830T123600Z").unwrap();
        assert!(
            matches!(
                verify(&req, &c, "us-east-1", "ec2", now),
                Err(AuthError::Malformed(_))
            ),
            "{auth}"
        );
    }
}

/// Signs with the aws-sigv4 crate (what coldsnap and every Rust SDK use)
/// in both forms, and checks we accept exactly what it signed.
#[allow(clippy::too_many_arguments)] // one call site per form, spelled out
fn sign_with_crate(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    location: aws_sigv4::http_request::SignatureLocation,
    service: &str,
    time: std::time::SystemTime,
    unsigned: bool,
) -> (String, Vec<(String, String)>) {
    use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
    let identity: aws_smithy_runtime_api::client::identity::Identity =
        aws_credential_types::Credentials::new("AKIDEXAMPLE", SECRET, None, None, "test").into();
    let mut settings = SigningSettings::default();
    settings.signature_location = location;
    settings.expires_in = Some(std::time::Duration::from_secs(300));
    if unsigned {
        settings.payload_checksum_kind = aws_sigv4::http_request::PayloadChecksumKind::XAmzSha256;
    }
    let params = aws_sigv4::sign::v4::SigningParams::builder()
        .identity(&identity)
        .region("us-east-1")
        .name(service)
        .time(time)
        .settings(settings)
        .build()
        .unwrap()
        .into();
    let body = if unsigned {
        SignableBody::UnsignedPayload
    } else {
        SignableBody::Bytes(body)
    };
    let signable = SignableRequest::new(method, url, headers.iter().copied(), body).unwrap();
    let (instructions, _) = sign(signable, &params).unwrap().into_parts();
    let mut out: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
        .collect();
    for (k, v) in instructions.headers() {
        out.push((k.to_ascii_lowercase(), v.to_owned()));
    }
    let mut url = url.to_owned();
    for (k, v) in instructions.params() {
        url.push(if url.contains('?') { '&' } else { '?' });
        url.push_str(&format!("{k}={}", uri_encode(v.as_bytes(), true)));
    }
    (url, out)
}

fn split_url(url: &str) -> (&str, &str) {
    let rest = url.strip_prefix("http://localhost:8080").unwrap();
    rest.split_once('?').unwrap_or((rest, ""))
}

#[test]
fn crate_signed_requests_verify_in_both_forms() {
    use aws_sigv4::http_request::SignatureLocation;
    let c = creds();
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
    let now = 1_700_000_000;
    let body =
        b"Action=DescribeVolumes&Version=2016-11-15&Filter.1.Name=tag%3AName&Filter.1.Value.1=a+b";
    for location in [SignatureLocation::Headers, SignatureLocation::QueryParams] {
        let (url, headers) = sign_with_crate(
            "POST",
            "http://localhost:8080/?x=1&a=%2Fb%20c",
            &[
                ("host", "localhost:8080"),
                ("content-type", "application/x-www-form-urlencoded"),
            ],
            body,
            location,
            "ec2",
            time,
            false,
        );
        let (path, query) = split_url(&url);
        let sha = sha256_hex(body);
        let req = Request {
            method: "POST",
            path,
            query,
            headers: &headers,
            body_sha256: &sha,
            allow_unsigned_payload: false,
        };
        verify(&req, &c, "us-east-1", "ec2", now).unwrap_or_else(|e| panic!("{location:?}: {e}"));
        let tampered = sha256_hex(b"Action=DeleteVolume");
        let bad = Request {
            body_sha256: &tampered,
            ..req
        };
        assert!(
            verify(&bad, &c, "us-east-1", "ec2", now).is_err(),
            "{location:?}"
        );
        if location == SignatureLocation::QueryParams {
            assert!(matches!(
                verify(&req, &c, "us-east-1", "ec2", now + 301),
                Err(AuthError::Expired(_))
            ));
        }
    }
    // An EBS block upload with an unsigned payload, path with a number.
    let block = vec![7u8; 4096];
    let (url, headers) = sign_with_crate(
        "PUT",
        "http://localhost:8080/snapshots/snap-0123456789abcdef0/blocks/12",
        &[("host", "localhost:8080"), ("x-amz-checksum", "abc=")],
        &block,
        SignatureLocation::Headers,
        "ebs",
        time,
        true,
    );
    let (path, query) = split_url(&url);
    let sha = sha256_hex(&block);
    let req = Request {
        method: "PUT",
        path,
        query,
        headers: &headers,
        body_sha256: &sha,
        allow_unsigned_payload: true,
    };
    verify(&req, &c, "us-east-1", "ebs", now).unwrap();
    let strict = Request {
        allow_unsigned_payload: false,
        ..req
    };
    assert_eq!(
        verify(&strict, &c, "us-east-1", "ebs", now).unwrap_err(),
        AuthError::PayloadHash
    );
}

#[test]
fn dates_round_trip() {
    assert_eq!(parse_amz_date("19700101T000000Z"), Some(0));
    assert_eq!(parse_amz_date("20150830T123600Z"), Some(1_440_938_160));
    assert_eq!(format_amz_date(1_440_938_160), "20150830T123600Z");
    for bad in [
        "",
        "20150830T123600",
        "2015083OT123600Z",
        "20151330T123600Z",
        "+0150830T123600Z",
    ] {
        assert_eq!(parse_amz_date(bad), None, "{bad}");
    }
}

proptest! {
    #[test]
    fn dates_roundtrip_any(t in 0i64..253_402_300_799) {
        prop_assert_eq!(parse_amz_date(&format_amz_date(t)), Some(t));
    }

    #[test]
    fn arbitrary_requests_never_panic(
        auth in "(AWS4-HMAC-SHA256 )?[ -~]{0,120}",
        query in "[ -~]{0,80}",
        path in "/[ -~]{0,40}",
    ) {
        let c = creds();
        let headers = h(&[("host", "x"), ("x-amz-date", "20150830T123600Z"), ("authorization", &auth)]);
        let req = Request {
            method: "GET",
            path: &path,
            query: &query,
            headers: &headers,
            body_sha256: EMPTY_SHA,
            allow_unsigned_payload: false,
        };
        prop_assert!(verify(&req, &c, "us-east-1", "ec2", 1_440_938_160).is_err());
    }
}
