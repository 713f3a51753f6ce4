//! The AWS endpoint under test: a daemon started with `--aws-listen` and a
//! credentials file, and the real clients pointed at it: the `aws` CLI,
//! boto3/botocore (for paginators and hand-made signed requests), and
//! coldsnap. scripts/test installs them when missing and names them in
//! `AWS_CLI`, `AWS_PYTHON` and `COLDSNAP`.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

use crate::TestDaemon;

pub const KEY_ID: &str = "AKIAVOLUMEDTEST00001";
pub const SECRET: &str = "volumed/test/secret+key/0123456789abcdefghij";
pub const REGION: &str = "us-east-1";

/// `aws` from `AWS_CLI`, else PATH.
pub fn aws_bin() -> PathBuf {
    std::env::var_os("AWS_CLI")
        .map(PathBuf::from)
        .unwrap_or_else(|| "aws".into())
}

/// A Python that imports boto3, from `AWS_PYTHON`, else `python3`.
pub fn python_bin() -> PathBuf {
    std::env::var_os("AWS_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| "python3".into())
}

/// coldsnap from `COLDSNAP`, else `~/.cargo/bin/coldsnap`, else PATH.
pub fn coldsnap_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("COLDSNAP") {
        return p.into();
    }
    if let Some(home) = std::env::var_os("HOME") {
        let p = PathBuf::from(home).join(".cargo/bin/coldsnap");
        if p.exists() {
            return p;
        }
    }
    "coldsnap".into()
}

/// The environment every client of the endpoint at `url` gets: our key,
/// region and endpoint, no user configuration, no retries.
pub fn client_env(cmd: &mut Command, url: &str) {
    cmd.env("AWS_ACCESS_KEY_ID", KEY_ID)
        .env("AWS_SECRET_ACCESS_KEY", SECRET)
        .env("AWS_REGION", REGION)
        .env("AWS_DEFAULT_REGION", REGION)
        .env("AWS_ENDPOINT_URL", url)
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_MAX_ATTEMPTS", "1")
        .env("AWS_RETRY_MODE", "standard")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_PROFILE");
}

pub struct AwsEndpoint {
    pub daemon: TestDaemon,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    /// Holds the credentials file.
    _creds: tempfile::TempDir,
    pub credentials: PathBuf,
}

/// Writes a credentials file with our key (and a second profile) at mode 0600.
pub fn write_credentials(dir: &std::path::Path, mode: u32) -> PathBuf {
    let p = dir.join("credentials");
    std::fs::write(
        &p,
        format!(
            "[default]\naws_access_key_id = {KEY_ID}\naws_secret_access_key = {SECRET}\n\n[other]\naws_access_key_id = AKIAOTHER\naws_secret_access_key = other-secret\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p
}

impl AwsEndpoint {
    pub fn start() -> Self {
        Self::start_with_env(&[])
    }

    pub fn start_with_env(extra: &[(&str, &str)]) -> Self {
        let creds = tempfile::tempdir().unwrap();
        let credentials = write_credentials(creds.path(), 0o600);
        let cred = credentials.display().to_string();
        let mut env = vec![
            ("VOLUMED_AWS_LISTEN", "127.0.0.1:0"),
            ("VOLUMED_AWS_CREDENTIALS", cred.as_str()),
        ];
        env.extend_from_slice(extra);
        let daemon = TestDaemon::start_with_env(&env);
        let st = daemon.vol_json(&["status"]);
        let addr = st["aws_listen"].as_str().expect("aws_listen in status");
        let tls = extra.iter().any(|(k, _)| *k == "VOLUMED_AWS_TLS_CERT");
        let scheme = if tls { "https" } else { "http" };
        AwsEndpoint {
            url: format!("{scheme}://{addr}"),
            daemon,
            _creds: creds,
            credentials,
        }
    }

    fn client_env(&self, cmd: &mut Command) {
        client_env(cmd, &self.url);
    }

    /// Runs `aws ARGS` against the endpoint, with JSON output.
    pub fn aws_with(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new(aws_bin());
        self.client_env(&mut cmd);
        cmd.args(["--endpoint-url", &self.url, "--output", "json"]);
        cmd.args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output()
            .expect("run aws (is awscli installed? see scripts/test)")
    }

    pub fn aws(&self, args: &[&str]) -> Output {
        self.aws_with(args, &[])
    }

    /// `aws ARGS` that must succeed; its JSON (null when it prints nothing).
    pub fn aws_json(&self, args: &[&str]) -> Value {
        let out = self.aws(args);
        assert!(
            out.status.success(),
            "aws {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let s = String::from_utf8_lossy(&out.stdout);
        if s.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&s).unwrap_or_else(|e| panic!("aws {args:?}: {e}: {s}"))
        }
    }

    /// `aws ARGS` that must fail; its stderr.
    pub fn aws_err(&self, args: &[&str]) -> String {
        let out = self.aws(args);
        assert!(
            !out.status.success(),
            "aws {args:?} should have failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Runs a Python script with boto3 and the helpers of [`PY_PRELUDE`];
    /// returns its stdout, failing the test on a non-zero exit.
    pub fn python(&self, script: &str) -> String {
        let mut cmd = Command::new(python_bin());
        self.client_env(&mut cmd);
        cmd.arg("-")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("run python (boto3)");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(format!("{PY_PRELUDE}\n{script}").as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "python failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A hand-made request signed by botocore's own signer, for what the
    /// CLI will not send (unknown actions, missing parameters, tampering).
    /// Returns `(status, body)`.
    pub fn signed(&self, spec: &Value) -> (u16, String) {
        // A JSON string literal is a valid Python one.
        let lit = serde_json::to_string(&spec.to_string()).unwrap();
        let out = self.python(&format!("send(json.loads({lit}))\n"));
        let (status, body) = out.split_once('\n').unwrap_or((out.as_str(), ""));
        (status.trim().parse().unwrap(), body.to_owned())
    }

    /// An EC2 Query request (form body) signed for ec2; `(status, body)`.
    pub fn ec2_raw(&self, form: &str) -> (u16, String) {
        self.signed(&serde_json::json!({ "body": form }))
    }

    pub fn coldsnap(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(coldsnap_bin());
        self.client_env(&mut cmd);
        cmd.args(["--endpoint", &self.url, "--region", REGION]);
        cmd.args(args);
        cmd.output()
            .expect("run coldsnap (is it installed? see scripts/test)")
    }
}

/// Python helpers: `send(spec)` signs with botocore's SigV4Auth and sends
/// with urllib, printing the status on one line and the body after it.
/// spec: body, path, method, service, region, secret, age (seconds the
/// signature is back-dated), tamper (a body sent instead of the signed one),
/// unsigned (send without any signature), headers.
pub const PY_PRELUDE: &str = r#"
import datetime, json, os, sys, urllib.request, urllib.error
import boto3, botocore.auth, botocore.awsrequest, botocore.credentials

ENDPOINT = os.environ["AWS_ENDPOINT_URL"]

def send(spec):
    body = spec.get("body", "")
    if isinstance(body, str):
        body = body.encode()
    method = spec.get("method", "POST")
    path = spec.get("path", "/")
    headers = {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}
    headers.update(spec.get("headers", {}))
    req = botocore.awsrequest.AWSRequest(method=method, url=ENDPOINT + path, data=body, headers=headers)
    if not spec.get("unsigned"):
        creds = botocore.credentials.Credentials(os.environ["AWS_ACCESS_KEY_ID"], spec.get("secret", os.environ["AWS_SECRET_ACCESS_KEY"]))
        age = spec.get("age", 0)
        real = botocore.auth.get_current_datetime
        botocore.auth.get_current_datetime = lambda: real() - datetime.timedelta(seconds=age)
        try:
            botocore.auth.SigV4Auth(creds, spec.get("service", "ec2"), spec.get("region", os.environ["AWS_REGION"])).add_auth(req)
        finally:
            botocore.auth.get_current_datetime = real
    prepared = req.prepare()
    data = prepared.body
    if "tamper" in spec:
        data = spec["tamper"].encode()
    r = urllib.request.Request(prepared.url, data=data if method != "GET" else None, method=method, headers=dict(prepared.headers))
    try:
        with urllib.request.urlopen(r) as resp:
            status, out = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, out = e.code, e.read()
    print(status)
    sys.stdout.write(out.decode(errors="replace"))
"#;

/// The text of `<Code>` in an EC2 error document.
pub fn ec2_code(body: &str) -> &str {
    body.split_once("<Code>")
        .and_then(|(_, r)| r.split_once("</Code>"))
        .map(|(c, _)| c)
        .unwrap_or("")
}
