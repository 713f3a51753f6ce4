//! The AWS endpoint's front door: every request needs a valid SigV4
//! signature from a key in the credentials file; anything else gets the
//! error AWS clients expect and reaches no volume. Driven by the real
//! `aws` CLI and by botocore's own signer for requests the CLI cannot make.

use std::process::Command;

use serde_json::json;
use volumed_tests::aws::{AwsEndpoint, ec2_code, write_credentials};
use volumed_tests::pki::Pki;
use volumed_tests::volumed_bin;

/// A volume to aim destructive requests at; it must survive them all.
fn victim(ep: &AwsEndpoint) -> String {
    let v = ep.aws_json(&[
        "ec2",
        "create-volume",
        "--size",
        "1",
        "--availability-zone",
        "us-east-1a",
    ]);
    v["VolumeId"].as_str().unwrap().to_owned()
}

fn still_there(ep: &AwsEndpoint, id: &str) {
    let v = ep.daemon.vol_json(&["inspect", id]);
    assert_eq!(v["volume_id"], id);
    assert_eq!(v["state"], "available");
}

#[test]
fn unsigned_wrong_key_region_service_old_and_tampered_requests_are_refused() {
    let ep = AwsEndpoint::start();
    let id = victim(&ep);
    let delete = format!("Action=DeleteVolume&Version=2016-11-15&VolumeId={id}");

    // Unsigned, from the CLI and by hand.
    let err = ep.aws_err(&["--no-sign-request", "ec2", "describe-volumes"]);
    assert!(err.contains("AuthFailure"), "{err}");
    let (status, body) = ep.signed(&json!({ "body": delete, "unsigned": true }));
    assert_eq!((status, ec2_code(&body)), (401, "AuthFailure"), "{body}");

    // A wrong secret.
    let err = ep.aws_with(
        &["ec2", "delete-volume", "--volume-id", &id],
        &[("AWS_SECRET_ACCESS_KEY", "wrong")],
    );
    let stderr = String::from_utf8_lossy(&err.stderr);
    assert!(
        !err.status.success() && stderr.contains("SignatureDoesNotMatch"),
        "{stderr}"
    );
    // An unknown key.
    let err = ep.aws_with(
        &["ec2", "delete-volume", "--volume-id", &id],
        &[("AWS_ACCESS_KEY_ID", "AKIANOBODY")],
    );
    let stderr = String::from_utf8_lossy(&err.stderr);
    assert!(
        !err.status.success() && stderr.contains("AuthFailure"),
        "{stderr}"
    );

    // Signed for another region, and for another service.
    let err = ep.aws_err(&[
        "--region",
        "eu-west-1",
        "ec2",
        "delete-volume",
        "--volume-id",
        &id,
    ]);
    assert!(
        err.contains("SignatureDoesNotMatch") && err.contains("region"),
        "{err}"
    );
    let (status, body) = ep.signed(&json!({ "body": delete, "service": "ebs" }));
    assert_eq!(ec2_code(&body), "SignatureDoesNotMatch", "{status} {body}");
    assert!(body.contains("service"), "{body}");

    // Twenty minutes old.
    let (_, body) = ep.signed(&json!({ "body": delete, "age": 1200 }));
    assert_eq!(ec2_code(&body), "RequestExpired", "{body}");

    // Signed for one body, sent with another of the same length.
    let tampered = delete.replace("DeleteVolume", "DeleteVolumx");
    let (_, body) = ep.signed(&json!({ "body": delete, "tamper": tampered }));
    assert_eq!(ec2_code(&body), "SignatureDoesNotMatch", "{body}");

    // An EBS request signed for ec2.
    let (status, body) = ep.signed(&json!({ "method": "GET", "path": "/snapshots/snap-00000000000000000/blocks", "service": "ec2" }));
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("InvalidSignature") || body.contains("service"),
        "{body}"
    );

    still_there(&ep, &id);
    // The same request, properly signed, works: the refusals were about
    // the signature only.
    let (status, body) = ep.signed(&json!({ "body": delete }));
    assert_eq!(status, 200, "{body}");
    assert!(ep.daemon.vol(&["inspect", &id]).status.code() != Some(0));
    ep.daemon.finish();
}

#[test]
fn presigned_query_string_requests_verify_and_expire() {
    let ep = AwsEndpoint::start();
    let id = victim(&ep);
    let out = ep.python(&format!(
        r#"
import time
ec2 = boto3.client("ec2")
url = ec2.generate_presigned_url("describe_volumes", Params={{"VolumeIds": ["{id}"]}}, ExpiresIn=60, HttpMethod="GET")
print(urllib.request.urlopen(url).read().decode())
short = ec2.generate_presigned_url("describe_volumes", Params={{}}, ExpiresIn=1, HttpMethod="GET")
time.sleep(2.5)
try:
    urllib.request.urlopen(short)
    print("EXPIRED-ACCEPTED")
except urllib.error.HTTPError as e:
    print(e.read().decode())
bad = url.replace("X-Amz-Signature=", "X-Amz-Signature=0")[:len(url)]
try:
    urllib.request.urlopen(bad)
    print("BAD-ACCEPTED")
except urllib.error.HTTPError as e:
    print(e.read().decode())
"#
    ));
    assert!(out.contains(&format!("<volumeId>{id}</volumeId>")), "{out}");
    assert!(out.contains("<Code>RequestExpired</Code>"), "{out}");
    assert!(!out.contains("ACCEPTED"), "{out}");
    ep.daemon.finish();
}

#[test]
fn a_credentials_file_others_can_read_stops_the_daemon_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let creds = write_credentials(dir.path(), 0o644);
    let out = Command::new(volumed_bin())
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args([
            "--nbd-listen",
            "127.0.0.1:0",
            "--aws-listen",
            "127.0.0.1:0",
            "--aws-credentials",
        ])
        .arg(&creds)
        .env_remove("VOLUMED_STORE")
        .env_remove("VOLUMED_SOCKET")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("chmod 600") && stderr.contains("644"),
        "{stderr}"
    );
    assert!(
        !dir.path().join("data/volumed.sock").exists(),
        "never became ready"
    );
    // A missing file and one without keys are refused the same way.
    for (name, text) in [("missing", None), ("empty", Some("# nothing\n"))] {
        let p = dir.path().join(name);
        if let Some(t) = text {
            std::fs::write(&p, t).unwrap();
            std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .unwrap();
        }
        let out = Command::new(volumed_bin())
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args([
                "--nbd-listen",
                "127.0.0.1:0",
                "--aws-listen",
                "127.0.0.1:0",
                "--aws-credentials",
            ])
            .arg(&p)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains("credentials"),
            "{name}: {stderr}"
        );
    }
}

#[test]
fn https_with_the_same_rustls_setup_as_nbd() {
    let pki = Pki::new();
    let cert = pki.path("server-cert.pem").display().to_string();
    let key = pki.path("server-key.pem").display().to_string();
    let ca = pki.path("ca-cert.pem").display().to_string();
    let ep = AwsEndpoint::start_with_env(&[
        ("VOLUMED_AWS_TLS_CERT", cert.as_str()),
        ("VOLUMED_AWS_TLS_KEY", key.as_str()),
    ]);
    assert!(ep.url.starts_with("https://127.0.0.1:"), "{}", ep.url);
    let out = ep.aws_with(
        &["ec2", "create-volume", "--size", "1"],
        &[("AWS_CA_BUNDLE", ca.as_str())],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = v["VolumeId"].as_str().unwrap();
    still_there(&ep, id);
    // Plain HTTP to the TLS port gets nowhere.
    let plain = ep.url.replace("https://", "http://");
    let out = ep.aws_with(&["--endpoint-url", &plain, "ec2", "describe-volumes"], &[]);
    assert!(!out.status.success());
    // Nor does a client that does not trust the certificate.
    let out = ep.aws_with(
        &["ec2", "describe-volumes"],
        &[("AWS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")],
    );
    assert!(!out.status.success());
    ep.daemon.finish();
}
