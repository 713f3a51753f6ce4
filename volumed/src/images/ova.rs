//! The OVA an instance export writes: a POSIX ustar archive holding the
//! OVF descriptor first, then one stream-optimized VMDK per disk, as
//! VMware, VirtualBox and AWS's own instance exports lay it out. Pure:
//! headers and the descriptor as bytes; the job streams the disks between
//! them.

/// A tar block; every member and its header fill whole blocks.
pub const BLOCK: u64 = 512;

/// One disk of the appliance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OvaDisk {
    /// Its member name in the archive (`<task>-disk1.vmdk`).
    pub file: String,
    /// Bytes of the VMDK file.
    pub file_size: u64,
    /// The disk's virtual size in bytes.
    pub capacity: u64,
}

/// The ustar header of a regular file `name` of `size` bytes, mode 0644,
/// modified at `mtime` (seconds since the epoch). `name` must fit ustar's
/// 100 bytes; longer names are cut (ours are short).
pub fn header(name: &str, size: u64, mtime: u64) -> [u8; 512] {
    let mut h = [0u8; 512];
    let n = name.as_bytes();
    let n = &n[..n.len().min(99)];
    h[..n.len()].copy_from_slice(n);
    octal(&mut h[100..108], 0o644);
    octal(&mut h[108..116], 0);
    octal(&mut h[116..124], 0);
    // Sizes past 8 GiB do not fit 11 octal digits: GNU's base-256 form.
    if size < 0o77777777777 {
        octal(&mut h[124..136], size);
    } else {
        h[124] = 0x80;
        h[128..136].copy_from_slice(&size.to_be_bytes());
    }
    octal(&mut h[136..148], mtime.min(0o77777777777));
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    // The checksum is computed with its own field as spaces.
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    h
}

/// `value` in octal, zero-padded, NUL-terminated, filling `field`.
fn octal(field: &mut [u8], value: u64) {
    let digits = field.len() - 1;
    let s = format!("{value:0digits$o}");
    let s = &s.as_bytes()[s.len().saturating_sub(digits)..];
    field[..digits].copy_from_slice(s);
    field[digits] = 0;
}

/// Zero bytes after a member of `size` bytes, to the next block.
pub fn padding(size: u64) -> u64 {
    size.next_multiple_of(BLOCK) - size
}

/// The archive's end: two zero blocks.
pub const END: [u8; 1024] = [0; 1024];

/// The OVF 1.0 descriptor of an appliance `name` with `disks` on one SCSI
/// controller (the first is the boot disk), `cpus` and `memory_mib`.
pub fn descriptor(name: &str, disks: &[OvaDisk], cpus: u32, memory_mib: u64) -> String {
    let name = xml_escape(name);
    let mut refs = String::new();
    let mut disk_section = String::new();
    let mut items = String::new();
    for (i, d) in disks.iter().enumerate() {
        let n = i + 1;
        refs.push_str(&format!(
            "    <File ovf:href=\"{}\" ovf:id=\"file{n}\" ovf:size=\"{}\"/>\n",
            xml_escape(&d.file),
            d.file_size
        ));
        disk_section.push_str(&format!(
            "    <Disk ovf:capacity=\"{}\" ovf:capacityAllocationUnits=\"byte\" ovf:diskId=\"vmdisk{n}\" ovf:fileRef=\"file{n}\" ovf:format=\"http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized\"/>\n",
            d.capacity
        ));
        items.push_str(&format!(
            "      <Item>\n        <rasd:AddressOnParent>{i}</rasd:AddressOnParent>\n        <rasd:ElementName>disk{n}</rasd:ElementName>\n        <rasd:HostResource>ovf:/disk/vmdisk{n}</rasd:HostResource>\n        <rasd:InstanceID>{}</rasd:InstanceID>\n        <rasd:Parent>3</rasd:Parent>\n        <rasd:ResourceType>17</rasd:ResourceType>\n      </Item>\n",
            10 + n
        ));
    }
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData">
  <References>
{refs}  </References>
  <DiskSection>
    <Info>Virtual disk information</Info>
{disk_section}  </DiskSection>
  <VirtualSystem ovf:id="{name}">
    <Info>A virtual machine exported by volumed</Info>
    <Name>{name}</Name>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>{name}</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>vmx-10</vssd:VirtualSystemType>
      </System>
      <Item>
        <rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits>
        <rasd:ElementName>{cpus} virtual CPU(s)</rasd:ElementName>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>{cpus}</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>
        <rasd:ElementName>{memory_mib} MB of memory</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>{memory_mib}</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:ElementName>SCSI Controller 0</rasd:ElementName>
        <rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>lsilogic</rasd:ResourceSubType>
        <rasd:ResourceType>6</rasd:ResourceType>
      </Item>
{items}    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"#
    )
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_ustar_with_a_valid_checksum() {
        let h = header("export-i-0123456789abcdef0-disk1.vmdk", 1536, 1_700_000_000);
        assert_eq!(&h[257..263], b"ustar\0");
        assert_eq!(&h[124..136], b"00000003000\0");
        assert_eq!(h[156], b'0');
        let stored = std::str::from_utf8(&h[148..154]).unwrap();
        let mut blank = h;
        blank[148..156].fill(b' ');
        let sum: u32 = blank.iter().map(|&b| u32::from(b)).sum();
        assert_eq!(u32::from_str_radix(stored, 8).unwrap(), sum);
        // Past 8 GiB the size is base-256.
        let big = header("d.vmdk", 20 << 30, 0);
        assert_eq!(big[124], 0x80);
        assert_eq!(
            u64::from_be_bytes(big[128..136].try_into().unwrap()),
            20 << 30
        );
    }

    #[test]
    fn sizes_and_padding_fill_blocks() {
        assert_eq!(padding(0), 0);
        assert_eq!(padding(1), 511);
        assert_eq!(padding(512), 0);
    }

    #[test]
    fn the_descriptor_names_every_disk() {
        let disks = [
            OvaDisk {
                file: "t-disk1.vmdk".into(),
                file_size: 100,
                capacity: 1 << 30,
            },
            OvaDisk {
                file: "t-disk2.vmdk".into(),
                file_size: 200,
                capacity: 2 << 30,
            },
        ];
        let d = descriptor("i-1<&>", &disks, 2, 1024);
        assert!(d.contains(r#"ovf:href="t-disk2.vmdk""#));
        assert!(d.contains(r#"ovf:capacity="2147483648""#));
        assert!(d.contains("i-1&lt;&amp;&gt;"));
        assert_eq!(d.matches("<rasd:ResourceType>17<").count(), 2);
    }
}
