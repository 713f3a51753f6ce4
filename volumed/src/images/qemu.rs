//! The qemu processes an import uses: `qemu-img info` to inspect an image
//! (under an address-space and CPU-time limit and a deadline, as a hostile
//! header can make it allocate or loop), and `qemu-nbd` serving the image
//! read-only on a private Unix socket. The format is always given: qemu is
//! never asked to probe. Both start through `child::spawn`, so they die
//! with the daemon.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::process::{Child, Command};

use super::format::ImageFormat;
use crate::child::{self, Limits};

/// `qemu-img info` may use this much address space: a qcow2 header can ask
/// for huge L1 and refcount tables; a real image's inspection uses tens of
/// MiB.
const INFO_ADDRESS_SPACE: u64 = 1 << 30;
/// CPU seconds `qemu-img info` may use, and its wall-clock deadline.
const INFO_CPU_SECS: u64 = 10;
const INFO_DEADLINE: Duration = Duration::from_secs(30);
/// How long qemu-nbd may take to put its socket up.
const NBD_START_DEADLINE: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("{program} is not installed (install qemu-utils to import {format} images)")]
    Missing {
        program: &'static str,
        format: ImageFormat,
    },
    #[error("{program}: {message}")]
    Failed {
        program: &'static str,
        message: String,
    },
    #[error("{program} took longer than {secs} s")]
    Timeout { program: &'static str, secs: u64 },
    #[error("{program}")]
    Io {
        program: &'static str,
        source: std::io::Error,
    },
}

/// Where qemu reads the image: a whole file, or a byte range of one (a disk
/// inside an OVA, read through qemu's raw driver with an offset).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    pub path: PathBuf,
    pub format: ImageFormat,
    pub range: Option<(u64, u64)>,
}

impl ImageSpec {
    /// The arguments naming the image: `-f FMT PATH`, or `--image-opts`.
    fn args(&self, format_flag: &str) -> Vec<String> {
        match self.range {
            None => vec![
                format_flag.to_owned(),
                self.format.to_string(),
                "--".into(),
                self.path.display().to_string(),
            ],
            Some((offset, size)) => {
                // qemu's option syntax doubles a comma inside a value.
                let path = self.path.display().to_string().replace(',', ",,");
                vec![
                    "--image-opts".into(),
                    format!(
                        "driver={},file.driver=raw,file.offset={offset},file.size={size},\
                         file.file.driver=file,file.file.filename={path}",
                        self.format
                    ),
                ]
            }
        }
    }
}

fn spawn_error(
    program: &'static str,
    format: ImageFormat,
) -> impl FnOnce(std::io::Error) -> QemuError {
    move |source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            QemuError::Missing { program, format }
        } else {
            QemuError::Io { program, source }
        }
    }
}

/// qemu's message in one line: the last non-empty stderr line, without the
/// program's name in front.
pub fn one_line(program: &str, stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let line = text
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap_or("failed without a message");
    line.strip_prefix(&format!("{program}: "))
        .unwrap_or(line)
        .to_owned()
}

/// Runs `qemu-img SUBCOMMAND --output=json` on the image under the
/// address-space limit, `cpu_secs` of CPU and a wall-clock `deadline`.
async fn qemu_img_json(
    subcommand: &str,
    spec: &ImageSpec,
    cpu_secs: u64,
    deadline: Duration,
) -> Result<std::process::Output, QemuError> {
    const P: &str = "qemu-img";
    let mut args: Vec<String> = vec![subcommand.into(), "--output=json".into()];
    args.extend(spec.args("-f"));
    let mut cmd = Command::new(P);
    cmd.args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let limits = Limits {
        address_space: INFO_ADDRESS_SPACE,
        cpu_secs,
    };
    let child = child::spawn(cmd, Some(limits))
        .await
        .map_err(spawn_error(P, spec.format))?;
    tokio::time::timeout(deadline, child.wait_with_output())
        .await
        .map_err(|_| QemuError::Timeout {
            program: P,
            secs: deadline.as_secs(),
        })?
        .map_err(|source| QemuError::Io { program: P, source })
}

/// `qemu-img info --output=json` of the image, bounded.
pub async fn info(spec: &ImageSpec) -> Result<Value, QemuError> {
    const P: &str = "qemu-img";
    let out = qemu_img_json("info", spec, INFO_CPU_SECS, INFO_DEADLINE).await?;
    if !out.status.success() {
        return Err(QemuError::Failed {
            program: P,
            message: one_line(P, &out.stderr),
        });
    }
    serde_json::from_slice(&out.stdout).map_err(|e| QemuError::Failed {
        program: P,
        message: format!("unreadable info: {e}"),
    })
}

/// `qemu-img check` walks every table of a large image: it gets more CPU
/// time than `info`, under the same address-space limit.
const CHECK_CPU_SECS: u64 = 60;
const CHECK_DEADLINE: Duration = Duration::from_secs(120);

/// `qemu-img check` of a qcow2, VMDK or VHDX image (other formats have
/// none): qemu reads past the end of a truncated file as zeros, so only the
/// check sees that its tables point beyond it. Leaked clusters are fine.
pub async fn check(spec: &ImageSpec) -> Result<(), QemuError> {
    const P: &str = "qemu-img";
    let out = qemu_img_json("check", spec, CHECK_CPU_SECS, CHECK_DEADLINE).await?;
    // 0: clean; 3: leaked clusters only; 63: this format has no check.
    match out.status.code() {
        Some(0 | 3 | 63) => Ok(()),
        Some(2) => {
            let n = serde_json::from_slice::<Value>(&out.stdout)
                .ok()
                .and_then(|v| v.get("corruptions").and_then(Value::as_u64))
                .unwrap_or(0);
            Err(QemuError::Failed {
                program: P,
                message: format!(
                    "qemu-img check found {n} corruptions: the image is truncated or damaged"
                ),
            })
        }
        _ => {
            // The first ERROR line names the problem; the last is a summary.
            let text = String::from_utf8_lossy(&out.stderr);
            let first = text
                .lines()
                .map(str::trim)
                .find(|l| l.starts_with("ERROR"))
                .map(|l| {
                    l.trim_start_matches("ERROR")
                        .trim_start_matches(':')
                        .trim()
                        .to_owned()
                });
            Err(QemuError::Failed {
                program: P,
                message: first.unwrap_or_else(|| one_line(P, &out.stderr)),
            })
        }
    }
}

/// A running `qemu-nbd --read-only` on a socket in a private directory;
/// killed when dropped.
pub struct NbdServer {
    child: Child,
    socket: PathBuf,
}

impl NbdServer {
    /// Serves `spec` on `dir/nbd.sock` to up to `connections` clients.
    pub async fn start(
        spec: &ImageSpec,
        dir: &Path,
        connections: usize,
    ) -> Result<Self, QemuError> {
        const P: &str = "qemu-nbd";
        let socket = dir.join("nbd.sock");
        let _ = std::fs::remove_file(&socket);
        let mut args: Vec<String> = vec![
            "--read-only".into(),
            "--persistent".into(),
            format!("--shared={connections}"),
            format!("--socket={}", socket.display()),
            // The export name is the empty default; our client asks for "".
        ];
        args.extend(spec.args("--format"));
        let mut cmd = Command::new(P);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = child::spawn(cmd, None)
            .await
            .map_err(spawn_error(P, spec.format))?;
        let deadline = tokio::time::Instant::now() + NBD_START_DEADLINE;
        loop {
            if socket.exists() {
                return Ok(NbdServer { child, socket });
            }
            if let Some(_status) = child
                .try_wait()
                .map_err(|source| QemuError::Io { program: P, source })?
            {
                let mut err = Vec::new();
                if let Some(mut e) = child.stderr.take() {
                    use tokio::io::AsyncReadExt;
                    let _ = e.read_to_end(&mut err).await;
                }
                return Err(QemuError::Failed {
                    program: P,
                    message: one_line(P, &err),
                });
            }
            if tokio::time::Instant::now() > deadline {
                return Err(QemuError::Timeout {
                    program: P,
                    secs: NBD_START_DEADLINE.as_secs(),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// What qemu-nbd said on stderr once it has exited (after a failed
    /// read), else nothing.
    pub async fn stop(mut self) -> Option<String> {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        let mut err = Vec::new();
        if let Some(mut e) = self.child.stderr.take() {
            use tokio::io::AsyncReadExt;
            let _ = e.read_to_end(&mut err).await;
        }
        let _ = std::fs::remove_file(&self.socket);
        (!err.is_empty()).then(|| one_line("qemu-nbd", &err))
    }
}

/// For `vol status`: `qemu-img VERSION` when both qemu-img and qemu-nbd
/// run, else `missing` (only raw images import then).
pub async fn tools_version() -> String {
    async fn version(p: &str) -> Option<String> {
        let mut cmd = Command::new(p);
        cmd.arg("--version");
        let out = child::output_if_ok(cmd).await?;
        let text = String::from_utf8_lossy(&out).into_owned();
        let first = text.lines().next()?.to_owned();
        // "qemu-img version 10.0.2 (Debian ...)"
        first.split_whitespace().nth(2).map(str::to_owned)
    }
    match (version("qemu-img").await, version("qemu-nbd").await) {
        (Some(v), Some(_)) => format!("qemu-utils {v}"),
        _ => "missing".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_one_line() {
        assert_eq!(
            one_line(
                "qemu-img",
                b"qemu-img: Could not open 'x': No such file\n\n"
            ),
            "Could not open 'x': No such file"
        );
        assert_eq!(one_line("qemu-img", b""), "failed without a message");
    }

    #[test]
    fn image_opts_double_commas() {
        let s = ImageSpec {
            path: "/a,b/c.ova".into(),
            format: ImageFormat::Vmdk,
            range: Some((512, 1024)),
        };
        let a = s.args("");
        assert_eq!(a[0], "--image-opts");
        assert!(a[1].ends_with("file.file.filename=/a,,b/c.ova"), "{}", a[1]);
        assert!(a[1].starts_with("driver=vmdk,file.driver=raw,file.offset=512,file.size=1024"));
    }
}
