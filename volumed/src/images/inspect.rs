//! The safety check before an import: the format detected (or taken from
//! the request), the header refused on its own terms (`format`), then
//! `qemu-img info` asked the same questions (backing file, data file,
//! encryption, extents outside the image), since qemu's reading is what the
//! import will trust. An OVA is opened here into its disks.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::ImageError;
use super::format::{self, ImageFormat, Refusal, TarHeader};
use super::qemu::{self, ImageSpec};

/// Largest OVF descriptor read, and how many tar members are walked.
const MAX_OVF: u64 = 4 << 20;
const MAX_TAR_MEMBERS: usize = 1024;

/// A disk ready to be read: where qemu (or the raw reader) finds it, and
/// its virtual size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    pub spec: ImageSpec,
    pub size: u64,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Open {
        path: path.display().to_string(),
        source,
    }
}

/// Head and tail of a byte range of a file.
fn head_tail(path: &Path, start: u64, len: u64) -> Result<(Vec<u8>, Vec<u8>), ImageError> {
    let mut f = std::fs::File::open(path).map_err(io_err(path))?;
    let mut head = vec![0u8; (format::HEAD_LEN as u64).min(len) as usize];
    f.seek(SeekFrom::Start(start)).map_err(io_err(path))?;
    f.read_exact(&mut head).map_err(io_err(path))?;
    let tail_len = (format::TAIL_LEN as u64).min(len);
    let mut tail = vec![0u8; tail_len as usize];
    f.seek(SeekFrom::Start(start + len - tail_len))
        .map_err(io_err(path))?;
    f.read_exact(&mut tail).map_err(io_err(path))?;
    Ok((head, tail))
}

fn read_range(path: &Path, start: u64, len: u64) -> Result<Vec<u8>, ImageError> {
    let mut f = std::fs::File::open(path).map_err(io_err(path))?;
    f.seek(SeekFrom::Start(start)).map_err(io_err(path))?;
    let mut buf = Vec::new();
    f.take(len).read_to_end(&mut buf).map_err(io_err(path))?;
    Ok(buf)
}

/// The disks of `path` read as `format` (detected when `None`), each
/// checked; a plain image is one disk, an OVA one per disk.
pub async fn open(path: &Path, format: Option<ImageFormat>) -> Result<Vec<Disk>, ImageError> {
    let meta = std::fs::metadata(path).map_err(io_err(path))?;
    if !meta.is_file() {
        return Err(ImageError::NotAFile(path.display().to_string()));
    }
    let len = meta.len();
    let format = match format {
        Some(f) => f,
        None => {
            let (head, tail) = head_tail(path, 0, len)?;
            format::detect(&head, &tail)
        }
    };
    if format == ImageFormat::Ova {
        return open_ova(path, len).await;
    }
    let spec = ImageSpec {
        path: path.to_owned(),
        format,
        range: None,
    };
    Ok(vec![check(spec, len).await?])
}

/// Checks one image (whole file or tar member of `len` bytes).
async fn check(spec: ImageSpec, len: u64) -> Result<Disk, ImageError> {
    let start = spec.range.map_or(0, |r| r.0);
    if spec.format == ImageFormat::Raw {
        // Raw bytes have no header to trust or refuse; the size is the
        // file's, rounded up to a sector (the tail reads as zeros).
        return Ok(Disk {
            size: len.next_multiple_of(512),
            spec,
        });
    }
    if len == 0 {
        return Err(ImageError::NotAnImage {
            format: spec.format,
            message: "the file is empty".into(),
        });
    }
    let (head, tail) = head_tail(&spec.path, start, len)?;
    match spec.format {
        ImageFormat::Qcow2 => {
            format::check_qcow2(&head)?;
        }
        ImageFormat::Vmdk => {
            if let Some((off, dlen)) = format::vmdk_embedded_descriptor(&head) {
                let text = read_range(&spec.path, start + off, dlen.min(len.saturating_sub(off)))?;
                format::check_vmdk_descriptor(&text)?;
            } else if !head.starts_with(b"KDMV") && !head.starts_with(b"COWD") {
                if spec.range.is_some() {
                    // A descriptor inside an OVA would name other members,
                    // which qemu cannot open: only self-contained disks.
                    return Err(Refusal::ExtentOutside("a separate extent file".into()).into());
                }
                format::check_vmdk_descriptor(&head)?;
            }
        }
        ImageFormat::Vpc => {
            format::check_vpc_footer(&tail).or_else(|e| match e {
                // A dynamic VHD keeps a copy of the footer at its start.
                Refusal::Corrupt { .. } => format::check_vpc_footer(&head),
                other => Err(other),
            })?;
        }
        _ => {}
    }
    let info = qemu::info(&spec).await.map_err(|e| match e {
        qemu::QemuError::Failed { message, .. } => ImageError::NotAnImage {
            format: spec.format,
            message,
        },
        other => ImageError::Qemu(other),
    })?;
    check_info(&info, &spec.path, spec.range.is_some())?;
    if matches!(
        spec.format,
        ImageFormat::Qcow2 | ImageFormat::Vmdk | ImageFormat::Vhdx
    ) {
        qemu::check(&spec).await.map_err(|e| match e {
            qemu::QemuError::Failed { message, .. } => ImageError::NotAnImage {
                format: spec.format,
                message,
            },
            other => ImageError::Qemu(other),
        })?;
    }
    let size = info
        .get("virtual-size")
        .and_then(Value::as_u64)
        .ok_or_else(|| ImageError::NotAnImage {
            format: spec.format,
            message: "qemu-img info gave no virtual size".into(),
        })?;
    Ok(Disk { spec, size })
}

/// The same refusals, asked of qemu's own reading of the image.
pub fn check_info(info: &Value, path: &Path, member: bool) -> Result<(), Refusal> {
    if let Some(b) = info.get("backing-filename").and_then(Value::as_str) {
        return Err(Refusal::BackingFile(b.to_owned()));
    }
    if info.get("encrypted").and_then(Value::as_bool) == Some(true) {
        return Err(Refusal::Encrypted);
    }
    let data = info.pointer("/format-specific/data");
    if data.and_then(|d| d.get("data-file")).is_some() {
        return Err(Refusal::DataFile);
    }
    if data.and_then(|d| d.get("encrypt")).is_some() {
        return Err(Refusal::Encrypted);
    }
    let extents = data
        .and_then(|d| d.get("extents"))
        .and_then(Value::as_array);
    for e in extents.into_iter().flatten() {
        let name = e.get("filename").and_then(Value::as_str).unwrap_or("");
        if member {
            // A disk in an OVA is read through qemu's raw driver, whose
            // name for itself is a json: description of that range.
            if extents.is_some_and(|x| x.len() == 1) {
                continue;
            }
            return Err(Refusal::ExtentOutside(name.to_owned()));
        }
        if !beside(path, Path::new(name)) {
            return Err(Refusal::ExtentOutside(name.to_owned()));
        }
    }
    Ok(())
}

/// Whether `extent` (as qemu resolved it) is the image itself or a regular
/// file in the image's own directory, after following symlinks.
fn beside(image: &Path, extent: &Path) -> bool {
    let dir = image.parent().unwrap_or(Path::new("/"));
    let full = if extent.is_absolute() {
        extent.to_owned()
    } else {
        dir.join(extent)
    };
    let (Ok(full), Ok(dir)) = (full.canonicalize(), dir.canonicalize()) else {
        return false;
    };
    full.parent() == Some(dir.as_path()) && full.is_file()
}

/// Walks the tar: the OVF descriptor first, then each disk it names found
/// as a member, read as a VMDK through an offset.
async fn open_ova(path: &Path, len: u64) -> Result<Vec<Disk>, ImageError> {
    let bad = |message: &str| ImageError::NotAnImage {
        format: ImageFormat::Ova,
        message: message.to_owned(),
    };
    let mut members: Vec<(String, u64, u64)> = Vec::new();
    let mut ovf = None;
    let mut at = 0u64;
    while members.len() < MAX_TAR_MEMBERS {
        let end = at
            .checked_add(TarHeader::LEN)
            .ok_or_else(|| bad("archive too long"))?;
        if end > len {
            break;
        }
        let block = read_range(path, at, TarHeader::LEN)?;
        let Some(h) = TarHeader::parse(&block) else {
            break;
        };
        let h = h.map_err(bad)?;
        let data = end;
        data.checked_add(h.size)
            .filter(|&e| e <= len)
            .ok_or_else(|| bad("a member runs past the end of the archive"))?;
        if h.is_file() {
            if ovf.is_none() && h.name.ends_with(".ovf") {
                if h.size > MAX_OVF {
                    return Err(bad("the OVF descriptor is larger than 4 MiB"));
                }
                ovf = Some(String::from_utf8_lossy(&read_range(path, data, h.size)?).into_owned());
            }
            members.push((h.name.clone(), data, h.size));
        }
        at = data
            .checked_add(
                h.padded_size()
                    .ok_or_else(|| bad("member size overflows"))?,
            )
            .ok_or_else(|| bad("member size overflows"))?;
    }
    let ovf = ovf.ok_or_else(|| bad("no .ovf descriptor in the archive"))?;
    let hrefs = format::ovf_disks(&ovf).map_err(bad)?;
    let mut disks = Vec::new();
    for href in hrefs {
        let (_, offset, size) = members
            .iter()
            .find(|(n, _, _)| n == &href || n.rsplit('/').next() == Some(href.as_str()))
            .ok_or_else(|| ImageError::NotAnImage {
                format: ImageFormat::Ova,
                message: format!("disk {href:?} named by the OVF is not in the archive"),
            })?;
        let spec = ImageSpec {
            path: PathBuf::from(path),
            format: ImageFormat::Vmdk,
            range: Some((*offset, *size)),
        };
        disks.push(check(spec, *size).await?);
    }
    Ok(disks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_refusals() {
        let p = Path::new("/tmp/x.qcow2");
        let backed: Value =
            serde_json::json!({"backing-filename": "/etc/passwd", "virtual-size": 1});
        assert_eq!(
            check_info(&backed, p, false),
            Err(Refusal::BackingFile("/etc/passwd".into()))
        );
        let df: Value =
            serde_json::json!({"format-specific": {"type": "qcow2", "data": {"data-file": "d"}}});
        assert_eq!(check_info(&df, p, false), Err(Refusal::DataFile));
        let enc: Value = serde_json::json!({"encrypted": true});
        assert_eq!(check_info(&enc, p, false), Err(Refusal::Encrypted));
        let ext: Value = serde_json::json!({"format-specific": {"type": "vmdk",
            "data": {"extents": [{"filename": "/etc/shadow"}]}}});
        assert_eq!(
            check_info(&ext, p, false),
            Err(Refusal::ExtentOutside("/etc/shadow".into()))
        );
        assert_eq!(check_info(&serde_json::json!({}), p, false), Ok(()));
    }

    #[test]
    fn extents_beside_the_image_only() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("a.vmdk");
        std::fs::write(&img, b"x").unwrap();
        std::fs::write(d.path().join("a-flat.vmdk"), b"x").unwrap();
        std::os::unix::fs::symlink("/etc/hostname", d.path().join("evil.vmdk")).unwrap();
        assert!(beside(&img, Path::new("a-flat.vmdk")));
        assert!(beside(&img, &img));
        assert!(!beside(&img, Path::new("evil.vmdk")));
        assert!(!beside(&img, Path::new("/etc/hostname")));
        assert!(!beside(&img, Path::new("missing.vmdk")));
    }
}
