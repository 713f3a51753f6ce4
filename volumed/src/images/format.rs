//! Image formats recognized from their first and last bytes, and the
//! dangerous features refused from the headers themselves. Pure: bytes in,
//! values out, so every check is tested on arbitrary input. qemu is never
//! asked to probe: the format found here (or given) is passed to it
//! explicitly, so a raw image that starts with qcow2's magic stays raw.

use std::fmt;

/// How many bytes of the file's head detection and the header checks read.
pub const HEAD_LEN: usize = 64 << 10;
/// How many bytes of the file's tail: a VHD footer.
pub const TAIL_LEN: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageFormat {
    Raw,
    Qcow2,
    Vmdk,
    Vhdx,
    /// VHD, qemu's name for it.
    Vpc,
    Ova,
}

impl ImageFormat {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "raw" => ImageFormat::Raw,
            "qcow2" => ImageFormat::Qcow2,
            "vmdk" => ImageFormat::Vmdk,
            "vhdx" => ImageFormat::Vhdx,
            "vpc" | "vhd" => ImageFormat::Vpc,
            "ova" => ImageFormat::Ova,
            _ => return None,
        })
    }

    /// qemu's driver name (OVA is a tar of VMDKs, not a qemu format).
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Vmdk => "vmdk",
            ImageFormat::Vhdx => "vhdx",
            ImageFormat::Vpc => "vpc",
            ImageFormat::Ova => "ova",
        }
    }
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

const QCOW2_MAGIC: &[u8] = b"QFI\xfb";
const VMDK_SPARSE_MAGIC: &[u8] = b"KDMV";
/// A monolithic VMDK of ESX ("COWD"), which qemu reads as version 3.
const VMDK_COWD_MAGIC: &[u8] = b"COWD";
const VHDX_MAGIC: &[u8] = b"vhdxfile";
const VHD_COOKIE: &[u8] = b"conectix";
const TAR_MAGIC: &[u8] = b"ustar";

/// The format of a file from its head (up to [`HEAD_LEN`] bytes) and its
/// last [`TAIL_LEN`] bytes. Anything unrecognized is raw, as a raw image has
/// no header to recognize.
pub fn detect(head: &[u8], tail: &[u8]) -> ImageFormat {
    if head.starts_with(QCOW2_MAGIC) {
        ImageFormat::Qcow2
    } else if head.starts_with(VMDK_SPARSE_MAGIC)
        || head.starts_with(VMDK_COWD_MAGIC)
        || is_vmdk_descriptor(head)
    {
        ImageFormat::Vmdk
    } else if head.starts_with(VHDX_MAGIC) {
        ImageFormat::Vhdx
    } else if head.starts_with(VHD_COOKIE) || tail.starts_with(VHD_COOKIE) {
        ImageFormat::Vpc
    } else if is_ova(head) {
        ImageFormat::Ova
    } else {
        ImageFormat::Raw
    }
}

/// A VMDK text descriptor: printable text naming its disk type.
fn is_vmdk_descriptor(head: &[u8]) -> bool {
    let text = &head[..head.len().min(4096)];
    let printable = text
        .iter()
        .all(|&b| b == b'\n' || b == b'\r' || b == b'\t' || (0x20..0x7f).contains(&b));
    printable && (text.starts_with(b"# Disk DescriptorFile") || contains(text, b"createType="))
}

fn is_ova(head: &[u8]) -> bool {
    match TarHeader::parse(head) {
        Some(Ok(h)) => h.name.ends_with(".ovf"),
        _ => false,
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// What the header check refuses, naming the feature in one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("image has a backing file ({0}); only self-contained images are imported")]
    BackingFile(String),
    #[error("qcow2 image has an external data file; only self-contained images are imported")]
    DataFile,
    #[error("image is encrypted; decrypt it first")]
    Encrypted,
    #[error("vmdk extent {0:?} is outside the image; only extents beside the descriptor are read")]
    ExtentOutside(String),
    #[error(
        "vhd is a differencing disk (it has a parent); only self-contained images are imported"
    )]
    Differencing,
    #[error("{format} header is truncated or corrupt: {what}")]
    Corrupt {
        format: ImageFormat,
        what: &'static str,
    },
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes(s.try_into().ok()?))
}

fn be64(b: &[u8], at: usize) -> Option<u64> {
    let s = b.get(at..at.checked_add(8)?)?;
    Some(u64::from_be_bytes(s.try_into().ok()?))
}

fn le64(b: &[u8], at: usize) -> Option<u64> {
    let s = b.get(at..at.checked_add(8)?)?;
    Some(u64::from_le_bytes(s.try_into().ok()?))
}

/// Bit 1 of qcow2's incompatible features: an external data file.
const QCOW2_INCOMPAT_DATA_FILE: u64 = 1 << 2;

/// Checks a qcow2 header: no backing file, no encryption, no external data
/// file. Returns the virtual size.
pub fn check_qcow2(head: &[u8]) -> Result<u64, Refusal> {
    let corrupt = |what| Refusal::Corrupt {
        format: ImageFormat::Qcow2,
        what,
    };
    if !head.starts_with(QCOW2_MAGIC) {
        return Err(corrupt("no qcow2 magic"));
    }
    let version = be32(head, 4).ok_or(corrupt("short header"))?;
    if !(2..=3).contains(&version) {
        return Err(corrupt("unknown version"));
    }
    let backing_offset = be64(head, 8).ok_or(corrupt("short header"))?;
    let backing_len = be32(head, 16).ok_or(corrupt("short header"))?;
    let size = be64(head, 24).ok_or(corrupt("short header"))?;
    let crypt = be32(head, 32).ok_or(corrupt("short header"))?;
    if backing_offset != 0 {
        let name = usize::try_from(backing_offset)
            .ok()
            .and_then(|start| {
                let len = usize::try_from(backing_len.min(1023)).ok()?;
                head.get(start..start.checked_add(len)?)
            })
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .unwrap_or_else(|| "name beyond the header".into());
        return Err(Refusal::BackingFile(name));
    }
    if crypt != 0 {
        return Err(Refusal::Encrypted);
    }
    if version == 3 {
        let incompat = be64(head, 72).ok_or(corrupt("short header"))?;
        if incompat & QCOW2_INCOMPAT_DATA_FILE != 0 {
            return Err(Refusal::DataFile);
        }
    }
    Ok(size)
}

/// One extent line of a VMDK descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmdkExtent {
    pub sectors: u64,
    pub kind: String,
    /// None for a ZERO extent, which names no file.
    pub file: Option<String>,
}

/// Reads a VMDK descriptor's text (a descriptor file, or the one embedded
/// in a sparse extent): refuses a parent (a backing file) and extents whose
/// file is not a plain name beside the descriptor (absolute, or with a
/// directory part). Returns the extents.
pub fn check_vmdk_descriptor(text: &[u8]) -> Result<Vec<VmdkExtent>, Refusal> {
    let text = String::from_utf8_lossy(text);
    let mut extents = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(v) = line.strip_prefix("parentFileNameHint") {
            let v = v
                .trim_start()
                .trim_start_matches('=')
                .trim()
                .trim_matches('"');
            if !v.is_empty() {
                return Err(Refusal::BackingFile(v.to_owned()));
            }
        }
        if let Some(e) = parse_extent_line(line) {
            if let Some(f) = &e.file
                && (f.is_empty() || f.contains('/') || f == ".." || f == ".")
            {
                return Err(Refusal::ExtentOutside(f.clone()));
            }
            extents.push(e);
        }
    }
    Ok(extents)
}

/// `RW 2048 FLAT "name" 0`, `RDONLY 100 SPARSE "x.vmdk"`, `RW 8 ZERO`.
fn parse_extent_line(line: &str) -> Option<VmdkExtent> {
    let (access, rest) = line.split_once(char::is_whitespace)?;
    if !matches!(access, "RW" | "RDONLY" | "NOACCESS") {
        return None;
    }
    let rest = rest.trim_start();
    let (sectors, rest) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    let sectors = sectors.parse().ok()?;
    let rest = rest.trim_start();
    let (kind, rest) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    let rest = rest.trim_start();
    let file = rest
        .strip_prefix('"')
        .map(|r| r.split('"').next().unwrap_or("").to_owned());
    Some(VmdkExtent {
        sectors,
        kind: kind.to_owned(),
        file,
    })
}

/// The descriptor embedded in a sparse VMDK (magic `KDMV`): its byte range
/// in the file, if it has one. Offsets are in sectors in the header.
pub fn vmdk_embedded_descriptor(head: &[u8]) -> Option<(u64, u64)> {
    if !head.starts_with(VMDK_SPARSE_MAGIC) {
        return None;
    }
    let off = le64(head, 28)?;
    let len = le64(head, 36)?;
    if off == 0 || len == 0 {
        return None;
    }
    // A descriptor is a few KiB; a bigger one is not worth reading.
    let len = len.checked_mul(512)?.min(1 << 20);
    Some((off.checked_mul(512)?, len))
}

/// VHD disk types in the footer.
const VHD_DIFFERENCING: u32 = 4;

/// Checks a VHD footer (512 bytes starting with `conectix`): refuses a
/// differencing disk. Returns the virtual size.
pub fn check_vpc_footer(footer: &[u8]) -> Result<u64, Refusal> {
    let corrupt = |what| Refusal::Corrupt {
        format: ImageFormat::Vpc,
        what,
    };
    if !footer.starts_with(VHD_COOKIE) {
        return Err(corrupt("no conectix footer"));
    }
    let size = be64(footer, 48).ok_or(corrupt("short footer"))?;
    let kind = be32(footer, 60).ok_or(corrupt("short footer"))?;
    if kind == VHD_DIFFERENCING {
        return Err(Refusal::Differencing);
    }
    Ok(size)
}

/// One tar header block: the member's name, size and type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TarHeader {
    pub name: String,
    pub size: u64,
    /// `b'0'` or 0 for a regular file.
    pub kind: u8,
}

impl TarHeader {
    pub const LEN: u64 = 512;

    /// Parses a ustar header block. `None`: not one (or the all-zero end
    /// block); `Some(Err)`: a ustar block with a bad field.
    pub fn parse(block: &[u8]) -> Option<Result<TarHeader, &'static str>> {
        let block = block.get(..512)?;
        if block.get(257..262)? != TAR_MAGIC {
            return None;
        }
        let field = |r: std::ops::Range<usize>| {
            let f = &block[r];
            let end = f.iter().position(|&b| b == 0).unwrap_or(f.len());
            String::from_utf8_lossy(&f[..end]).into_owned()
        };
        let mut name = field(0..100);
        let prefix = field(345..500);
        if !prefix.is_empty() {
            name = format!("{prefix}/{name}");
        }
        let size_text = field(124..136);
        let size_text = size_text.trim_matches(|c: char| c == ' ' || c == '\0');
        let size = if size_text.is_empty() {
            0
        } else {
            match u64::from_str_radix(size_text, 8) {
                Ok(s) => s,
                Err(_) => return Some(Err("member size is not octal")),
            }
        };
        Some(Ok(TarHeader {
            name,
            size,
            kind: block[156],
        }))
    }

    pub fn is_file(&self) -> bool {
        self.kind == b'0' || self.kind == 0
    }

    /// Bytes the member's data takes in the archive, padded to blocks.
    pub fn padded_size(&self) -> Option<u64> {
        self.size.checked_next_multiple_of(Self::LEN)
    }
}

/// The disks an OVF descriptor names, in its DiskSection's order: each
/// `Disk`'s `fileRef` resolved through the `File` elements' `href`.
pub fn ovf_disks(ovf: &str) -> Result<Vec<String>, &'static str> {
    let mut files = Vec::new();
    let mut disks = Vec::new();
    for tag in ovf.split('<').skip(1) {
        let tag = tag.split('>').next().unwrap_or("");
        let elem = tag.split_whitespace().next().unwrap_or("");
        let local = elem.rsplit(':').next().unwrap_or(elem);
        match local {
            "File" => {
                if let (Some(id), Some(href)) = (attr(tag, "id"), attr(tag, "href")) {
                    files.push((id, href));
                }
            }
            "Disk" => disks.push(attr(tag, "fileRef").ok_or("a Disk has no fileRef")?),
            _ => {}
        }
    }
    if disks.is_empty() {
        return Err("the OVF descriptor names no disk");
    }
    disks
        .iter()
        .map(|r| {
            files
                .iter()
                .find(|(id, _)| id == r)
                .map(|(_, href)| href.clone())
                .ok_or("a Disk's fileRef names no File")
        })
        .collect()
}

/// The value of attribute `name` (with any namespace prefix) in a tag.
fn attr(tag: &str, name: &str) -> Option<String> {
    let mut rest = tag;
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq].split_whitespace().last().unwrap_or("");
        let key_local = key.rsplit(':').next().unwrap_or(key);
        let after = rest[eq + 1..].trim_start();
        let quote = after.chars().next()?;
        if quote != '"' && quote != '\'' {
            return None;
        }
        let body = &after[1..];
        let end = body.find(quote)?;
        if key_local == name {
            return Some(body[..end].to_owned());
        }
        rest = &body[end + 1..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn qcow2_header(version: u32, backing: u64, crypt: u32, incompat: u64) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[..4].copy_from_slice(QCOW2_MAGIC);
        h[4..8].copy_from_slice(&version.to_be_bytes());
        h[8..16].copy_from_slice(&backing.to_be_bytes());
        h[16..20].copy_from_slice(&11u32.to_be_bytes());
        h[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
        h[32..36].copy_from_slice(&crypt.to_be_bytes());
        h[72..80].copy_from_slice(&incompat.to_be_bytes());
        h[300..311].copy_from_slice(b"/etc/passwd");
        h
    }

    #[test]
    fn detects_each_format() {
        assert_eq!(detect(&qcow2_header(3, 0, 0, 0), &[]), ImageFormat::Qcow2);
        assert_eq!(detect(b"KDMV\x01\0\0\0", &[]), ImageFormat::Vmdk);
        assert_eq!(
            detect(
                b"# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicFlat\"\n",
                &[]
            ),
            ImageFormat::Vmdk
        );
        assert_eq!(detect(b"vhdxfile\0\0", &[]), ImageFormat::Vhdx);
        assert_eq!(detect(b"conectix", b""), ImageFormat::Vpc);
        assert_eq!(detect(&[0u8; 4096], b"conectix\0\0"), ImageFormat::Vpc);
        assert_eq!(detect(&[0u8; 4096], &[0u8; 512]), ImageFormat::Raw);
        assert_eq!(detect(b"", b""), ImageFormat::Raw);
        let mut tar = vec![0u8; 1024];
        tar[..8].copy_from_slice(b"vm.ovf\0\0");
        tar[124..135].copy_from_slice(b"00000000012");
        tar[156] = b'0';
        tar[257..262].copy_from_slice(TAR_MAGIC);
        assert_eq!(detect(&tar, &[]), ImageFormat::Ova);
        tar[..8].copy_from_slice(b"vm.txt\0\0");
        assert_eq!(detect(&tar, &[]), ImageFormat::Raw);
    }

    #[test]
    fn qcow2_refusals_name_the_feature() {
        assert_eq!(check_qcow2(&qcow2_header(3, 0, 0, 0)), Ok(1 << 30));
        assert_eq!(check_qcow2(&qcow2_header(2, 0, 0, 0)), Ok(1 << 30));
        assert_eq!(
            check_qcow2(&qcow2_header(3, 300, 0, 0)),
            Err(Refusal::BackingFile("/etc/passwd".into()))
        );
        assert_eq!(
            check_qcow2(&qcow2_header(3, 1 << 40, 0, 0)),
            Err(Refusal::BackingFile("name beyond the header".into()))
        );
        assert_eq!(
            check_qcow2(&qcow2_header(3, 0, 1, 0)),
            Err(Refusal::Encrypted)
        );
        assert_eq!(
            check_qcow2(&qcow2_header(3, 0, 0, QCOW2_INCOMPAT_DATA_FILE)),
            Err(Refusal::DataFile)
        );
        // Version 2 has no feature bits: whatever lies there is not one.
        assert_eq!(
            check_qcow2(&qcow2_header(2, 0, 0, QCOW2_INCOMPAT_DATA_FILE)),
            Ok(1 << 30)
        );
        assert!(matches!(
            check_qcow2(&qcow2_header(3, 0, 0, 0)[..40]),
            Err(Refusal::Corrupt { .. })
        ));
        assert!(matches!(
            check_qcow2(&qcow2_header(7, 0, 0, 0)),
            Err(Refusal::Corrupt { .. })
        ));
    }

    #[test]
    fn vmdk_descriptors() {
        let ok = b"# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n\
            createType=\"twoGbMaxExtentFlat\"\nRW 2048 FLAT \"disk-f001.vmdk\" 0\nRW 8 ZERO\n";
        let e = check_vmdk_descriptor(ok).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].file.as_deref(), Some("disk-f001.vmdk"));
        assert_eq!(e[1].file, None);
        let shadow = b"createType=\"monolithicFlat\"\nRW 2048 FLAT \"/etc/shadow\" 0\n";
        assert_eq!(
            check_vmdk_descriptor(shadow),
            Err(Refusal::ExtentOutside("/etc/shadow".into()))
        );
        let up = b"RW 2048 FLAT \"../x/y.vmdk\" 0\n";
        assert!(matches!(
            check_vmdk_descriptor(up),
            Err(Refusal::ExtentOutside(_))
        ));
        let parent = b"parentFileNameHint=\"base.vmdk\"\nRW 2048 SPARSE \"d.vmdk\"\n";
        assert_eq!(
            check_vmdk_descriptor(parent),
            Err(Refusal::BackingFile("base.vmdk".into()))
        );
    }

    #[test]
    fn vhd_footers() {
        let mut f = vec![0u8; 512];
        f[..8].copy_from_slice(VHD_COOKIE);
        f[48..56].copy_from_slice(&(64u64 << 20).to_be_bytes());
        f[60..64].copy_from_slice(&3u32.to_be_bytes());
        assert_eq!(check_vpc_footer(&f), Ok(64 << 20));
        f[60..64].copy_from_slice(&4u32.to_be_bytes());
        assert_eq!(check_vpc_footer(&f), Err(Refusal::Differencing));
    }

    #[test]
    fn ovf_disks_in_order() {
        let ovf = r#"<?xml version="1.0"?><Envelope xmlns:ovf="x">
          <References><File ovf:href="b.vmdk" ovf:id="f2"/><File ovf:href="a.vmdk" ovf:id="f1"/></References>
          <DiskSection><Info>d</Info>
            <Disk ovf:capacity="1" ovf:diskId="d1" ovf:fileRef="f1"/>
            <Disk ovf:capacity="1" ovf:diskId="d2" ovf:fileRef="f2"/>
          </DiskSection></Envelope>"#;
        assert_eq!(ovf_disks(ovf).unwrap(), vec!["a.vmdk", "b.vmdk"]);
        assert!(ovf_disks("<Envelope/>").is_err());
        assert!(ovf_disks(r#"<Disk ovf:fileRef="nope"/>"#).is_err());
    }

    proptest! {
        #[test]
        fn checks_never_panic(head in proptest::collection::vec(any::<u8>(), 0..2048),
                              tail in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = detect(&head, &tail);
            let _ = check_qcow2(&head);
            let _ = check_vmdk_descriptor(&head);
            let _ = vmdk_embedded_descriptor(&head);
            let _ = check_vpc_footer(&tail);
            let _ = TarHeader::parse(&head);
            let _ = ovf_disks(&String::from_utf8_lossy(&head));
        }

        #[test]
        fn qcow2_magic_with_any_tail_is_qcow2(rest in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut head = QCOW2_MAGIC.to_vec();
            head.extend(rest);
            prop_assert_eq!(detect(&head, &[]), ImageFormat::Qcow2);
        }

        #[test]
        fn any_backing_offset_is_refused(off in 1u64.., crypt in any::<u32>()) {
            let r = check_qcow2(&qcow2_header(3, off, crypt, 0));
            prop_assert!(matches!(r, Err(Refusal::BackingFile(_))), "{:?}", r);
        }

        #[test]
        fn extents_with_a_directory_are_refused(dir in "[a-z]{0,8}", name in "[a-z]{1,8}") {
            let line = format!("RW 16 FLAT \"{dir}/{name}\" 0\n");
            prop_assert!(matches!(check_vmdk_descriptor(line.as_bytes()), Err(Refusal::ExtentOutside(_))));
        }
    }
}
