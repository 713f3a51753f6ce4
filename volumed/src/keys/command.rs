//! Key material from a command, for keys whose material an external KMS
//! (Vault, a cloud KMS, an HSM) holds: `sh -c COMMAND` with the key's id,
//! name and version in `VOLUMED_KEY_ID`, `VOLUMED_KEY_NAME` and
//! `VOLUMED_KEY_VERSION`, printing the version's 32 bytes as 64 hex digits.
//! It runs when the key is loaded (at start, for every version), created
//! or rotated; the material then stays in memory only.

use std::process::Stdio;
use std::time::Duration;

use snapshot::crypt::MasterSecret;
use tokio::io::AsyncReadExt;

use super::file::parse_material;

/// A command that has not answered in this long is killed.
const DEADLINE: Duration = Duration::from_secs(30);
/// More output than this is not a key.
const MAX_OUTPUT: u64 = 4096;

/// Runs `command` for version `version` of key `id` (`name`).
pub async fn material(
    command: &str,
    id: &str,
    name: &str,
    version: u32,
) -> Result<MasterSecret, String> {
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .env("VOLUMED_KEY_ID", id)
        .env("VOLUMED_KEY_NAME", name)
        .env("VOLUMED_KEY_VERSION", version.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = crate::child::spawn(cmd, None)
        .await
        .map_err(|e| format!("start sh -c: {e}"))?;
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    let run = async {
        let (mut so, mut se) = (stdout.take(MAX_OUTPUT), stderr.take(MAX_OUTPUT));
        let (a, b) = tokio::join!(so.read_to_end(&mut out), se.read_to_end(&mut err));
        a.and(b)?;
        child.wait().await
    };
    let status = match tokio::time::timeout(DEADLINE, run).await {
        Ok(Ok(status)) => status,
        Ok(Err(e)) => return Err(format!("read its output: {e}")),
        Err(_) => return Err(format!("no answer within {}s", DEADLINE.as_secs())),
    };
    if !status.success() {
        let why = String::from_utf8_lossy(&err);
        let line = why.lines().next().unwrap_or("").trim();
        return Err(format!("exited with {status}: {line}"));
    }
    let text = String::from_utf8_lossy(&out);
    parse_material(&text).ok_or_else(|| "did not print 64 hex digits".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn material_comes_from_the_command_and_failures_say_why() {
        let hex = "0f".repeat(32);
        let m = material(&format!("echo {hex}"), "id", "n", 1)
            .await
            .unwrap();
        assert_eq!(m, MasterSecret([0x0f; 32]));
        // The key's coordinates reach the command.
        let m = material("printf '%064d' \"$VOLUMED_KEY_VERSION\"", "id", "n", 7)
            .await
            .unwrap();
        assert_eq!(m.0[31], 0x07);
        let e = material("echo nope >&2; exit 3", "id", "n", 1)
            .await
            .unwrap_err();
        assert_eq!(e, "exited with exit status: 3: nope");
        let e = material("echo short", "id", "n", 1).await.unwrap_err();
        assert_eq!(e, "did not print 64 hex digits");
    }
}
