//! A long-lived boto3 `ebs` client, for tests that call the EBS direct APIs
//! many times over a run: one Python process (from `AWS_PYTHON`) reads a
//! JSON request per line on stdin and answers one JSON line on stdout, so a
//! call costs no interpreter start. Blocks are filled with one byte, so a
//! request names a block by that byte and an answer says which byte a
//! block read back holds.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use serde_json::{Value, json};

use crate::aws::{client_env, python_bin};

/// The client's loop. Every answer is `{"error": CODE, "message": ...}` or
/// the call's result.
const SERVER: &str = r#"
import base64, hashlib, json, sys
import boto3, botocore.config, botocore.exceptions

BS = 524288
CONFIG = botocore.config.Config(connect_timeout=10, read_timeout=60, retries={"total_max_attempts": 1})

def clients():
    return boto3.client("ebs", config=CONFIG), boto3.client("ec2", config=CONFIG)

def b64sha(d):
    return base64.b64encode(hashlib.sha256(d).digest()).decode()

def blocks(ebs, sid):
    out, kw = {}, {}
    while True:
        r = ebs.list_snapshot_blocks(SnapshotId=sid, **kw)
        for b in r["Blocks"]:
            out[b["BlockIndex"]] = b["BlockToken"]
        if not r.get("NextToken"):
            return out
        kw = {"NextToken": r["NextToken"]}

def handle(ebs, ec2, req):
    op = req["op"]
    if op == "start":
        r = ebs.start_snapshot(VolumeSize=req["gib"])
        return {"id": r["SnapshotId"], "status": r["Status"]}
    if op == "put":
        data = bytes([req["byte"]]) * BS
        ebs.put_snapshot_block(SnapshotId=req["id"], BlockIndex=req["index"], BlockData=data,
                               DataLength=BS, Checksum=b64sha(data), ChecksumAlgorithm="SHA256")
        return {}
    if op == "complete":
        r = ebs.complete_snapshot(SnapshotId=req["id"], ChangedBlocksCount=req["count"])
        return {"status": r["Status"]}
    if op == "read":
        out = {}
        for i, token in sorted(blocks(ebs, req["id"]).items()):
            r = ebs.get_snapshot_block(SnapshotId=req["id"], BlockIndex=i, BlockToken=token)
            data = r["BlockData"].read()
            if len(data) != BS or r["Checksum"] != b64sha(data):
                return {"error": "BadBlock", "message": f"block {i}: {len(data)} bytes, checksum {r['Checksum']}"}
            out[str(i)] = data[0] if data.count(data[0]) == len(data) else None
        return {"blocks": out}
    if op == "state":
        try:
            s = ec2.describe_snapshots(SnapshotIds=[req["id"]])["Snapshots"]
        except botocore.exceptions.ClientError as e:
            if "NotFound" in e.response["Error"]["Code"]:
                return {"state": None}
            raise
        return {"state": s[0]["State"] if s else None}
    return {"error": "BadRequest", "message": f"unknown op {op}"}

ebs, ec2 = clients()
for line in sys.stdin:
    req = json.loads(line)
    if req["op"] == "reset":
        ebs, ec2 = clients()
        out = {}
    else:
        try:
            out = handle(ebs, ec2, req)
        except botocore.exceptions.ClientError as e:
            out = {"error": e.response["Error"]["Code"], "message": e.response["Error"].get("Message", "")}
        except Exception as e:
            out = {"error": type(e).__name__, "message": str(e)}
    print(json.dumps(out), flush=True)
"#;

/// An error the endpoint (or the client) answered.
#[derive(Debug, Clone)]
pub struct EbsError {
    pub code: String,
    pub message: String,
}

impl std::fmt::Display for EbsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

pub type EbsResult<T> = Result<T, EbsError>;

pub struct EbsClient {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl EbsClient {
    /// Starts the client for the endpoint at `url` (`http://ADDR:PORT`).
    pub fn start(url: &str) -> Self {
        let mut cmd = Command::new(python_bin());
        client_env(&mut cmd, url);
        let mut child = cmd
            .args(["-c", SERVER])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("run python (boto3; see scripts/test)");
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        EbsClient {
            child,
            stdin,
            stdout,
        }
    }

    fn call(&mut self, req: Value) -> EbsResult<Value> {
        writeln!(self.stdin, "{req}").expect("write to the boto3 client");
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .expect("read from the boto3 client");
        assert!(!line.is_empty(), "the boto3 client exited on {req}");
        let v: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("the boto3 client answered {line:?}: {e}"));
        match v.get("error") {
            Some(code) => Err(EbsError {
                code: code.as_str().unwrap_or_default().to_owned(),
                message: v["message"].as_str().unwrap_or_default().to_owned(),
            }),
            None => Ok(v),
        }
    }

    /// New connections, after the daemon restarted.
    pub fn reset(&mut self) {
        self.call(json!({"op": "reset"})).expect("reset");
    }

    /// StartSnapshot: `(id, status)`.
    pub fn start_snapshot(&mut self, gib: u64) -> EbsResult<(String, String)> {
        let v = self.call(json!({"op": "start", "gib": gib}))?;
        Ok((
            v["id"].as_str().unwrap_or_default().to_owned(),
            v["status"].as_str().unwrap_or_default().to_owned(),
        ))
    }

    /// PutSnapshotBlock of a block whose every byte is `byte`.
    pub fn put_block(&mut self, id: &str, index: u64, byte: u8) -> EbsResult<()> {
        self.call(json!({"op": "put", "id": id, "index": index, "byte": byte}))
            .map(|_| ())
    }

    /// CompleteSnapshot: the status it answers.
    pub fn complete(&mut self, id: &str, count: u64) -> EbsResult<String> {
        let v = self.call(json!({"op": "complete", "id": id, "count": count}))?;
        Ok(v["status"].as_str().unwrap_or_default().to_owned())
    }

    /// Every block ListSnapshotBlocks names, read with GetSnapshotBlock
    /// (checksum checked): the byte it is filled with, `None` if mixed.
    pub fn read_blocks(&mut self, id: &str) -> EbsResult<BTreeMap<u64, Option<u8>>> {
        let v = self.call(json!({"op": "read", "id": id}))?;
        Ok(v["blocks"]
            .as_object()
            .expect("blocks")
            .iter()
            .map(|(i, b)| {
                (
                    i.parse().expect("a block index"),
                    b.as_u64().map(|b| b as u8),
                )
            })
            .collect())
    }

    /// DescribeSnapshots' state of `id`, `None` when not found.
    pub fn state(&mut self, id: &str) -> EbsResult<Option<String>> {
        let v = self.call(json!({"op": "state", "id": id}))?;
        Ok(v["state"].as_str().map(str::to_owned))
    }
}

impl Drop for EbsClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
