//! Block-device mappings in EC2's words: `BlockDeviceMapping.N.DeviceName`
//! with `.VirtualName`, `.NoDevice` or `.Ebs.{SnapshotId, VolumeSize,
//! VolumeType, DeleteOnTermination, Iops, Throughput, Encrypted, KmsKeyId}` parsed
//! into the shared `BlockDeviceMapping`, written back as
//! `<blockDeviceMapping>` items, and the machines layer's errors as EC2's
//! codes.

use volumed_api::{BlockDeviceMapping, EbsDevice};

use super::params::Params;
use super::xml::Xml;
use super::{Ec2Error, Ec2Result};
use crate::machines::MachineError;

const EBS_FIELDS: &[&str] = &[
    "SnapshotId",
    "VolumeSize",
    "VolumeType",
    "DeleteOnTermination",
    "Iops",
    "Throughput",
    "Encrypted",
    "KmsKeyId",
];

fn invalid_mapping(message: impl Into<String>) -> Ec2Error {
    Ec2Error::new("InvalidBlockDeviceMapping", message)
}

/// `PREFIX.N.*` as mappings, in N's order. Each is checked for form (one
/// source, device name, virtual name, sizes); whether it is complete
/// depends on the action.
pub fn parse(p: &Params, prefix: &str) -> Ec2Result<Vec<BlockDeviceMapping>> {
    let mut out = Vec::new();
    for n in p.indices(prefix)? {
        let base = format!("{prefix}.{n}");
        let field = |f: &str| p.get(&format!("{base}.{f}"));
        // Every key under this entry must be one we read.
        let known = |k: &str| {
            matches!(k, "DeviceName" | "VirtualName" | "NoDevice")
                || k.strip_prefix("Ebs.")
                    .is_some_and(|e| EBS_FIELDS.contains(&e))
        };
        let dotted = format!("{base}.");
        for k in p.keys_under(&dotted) {
            if !known(k) {
                return Err(Ec2Error::new(
                    "UnknownParameter",
                    format!("The parameter {dotted}{k} is not recognized"),
                ));
            }
        }
        let device_name = field("DeviceName")
            .ok_or_else(|| invalid_mapping(format!("Missing device name in {base}")))?
            .to_owned();
        let has_ebs = p.keys_under(&format!("{base}.Ebs.")).next().is_some();
        let ebs = if has_ebs {
            let num = |f: &str| p.u64(&format!("{base}.Ebs.{f}"));
            // As CreateVolume's: a key requires Encrypted=true; whether
            // the store can encrypt is the engine's to say at launch.
            let encrypted = p.bool(&format!("{base}.Ebs.Encrypted"))?;
            let kms_key_id = field("Ebs.KmsKeyId").map(str::to_owned);
            if kms_key_id.is_some() && encrypted != Some(true) {
                return Err(Ec2Error::new(
                    "InvalidParameterDependency",
                    format!(
                        "{device_name}: the parameter KmsKeyId requires the parameter Encrypted to be set."
                    ),
                ));
            }
            Some(EbsDevice {
                snapshot_id: field("Ebs.SnapshotId").map(str::to_owned),
                volume_size: num("VolumeSize")?,
                volume_type: field("Ebs.VolumeType").map(str::to_owned),
                delete_on_termination: p.bool(&format!("{base}.Ebs.DeleteOnTermination"))?,
                iops: num("Iops")?,
                throughput: num("Throughput")?,
                encrypted,
                kms_key_id,
            })
        } else {
            None
        };
        // A type given here is held to its sizes and parameters, as at
        // CreateVolume (a size taken from the snapshot is not checked).
        if let Some(e) = &ebs
            && let Some(t) = &e.volume_type
        {
            let vt = super::volume_types::lookup(t)?;
            if let Some(g) = e.volume_size {
                vt.check_size(g)?;
            }
            vt.check_performance(e.iops, e.throughput)?;
        }
        let m = BlockDeviceMapping {
            device_name,
            ebs,
            virtual_name: field("VirtualName").map(str::to_owned),
            // Present means "no device", whatever its value (EC2 sends "").
            no_device: field("NoDevice").is_some(),
        };
        m.kind().map_err(|e| invalid_mapping(e.to_string()))?;
        out.push(m);
    }
    Ok(out)
}

/// `<blockDeviceMapping>` of an image, each entry as it was given.
pub fn write(x: &mut Xml, mappings: &[BlockDeviceMapping]) {
    x.open("blockDeviceMapping");
    for m in mappings {
        x.open("item").elem("deviceName", &m.device_name);
        x.opt("virtualName", m.virtual_name.as_deref());
        if m.no_device {
            x.elem("noDevice", "");
        }
        if let Some(e) = &m.ebs {
            x.open("ebs")
                .opt("snapshotId", e.snapshot_id.as_deref())
                .opt("volumeSize", e.volume_size)
                .opt("deleteOnTermination", e.delete_on_termination)
                .opt("volumeType", e.volume_type.as_deref())
                .opt("iops", e.iops)
                .opt("throughput", e.throughput)
                .elem("encrypted", e.encrypted.unwrap_or(false))
                .opt("kmsKeyId", e.kms_key_id.as_deref())
                .close("ebs");
        }
        x.close("item");
    }
    x.close("blockDeviceMapping");
}

/// The machines layer's errors in EC2's words.
impl From<MachineError> for Ec2Error {
    fn from(e: MachineError) -> Self {
        let code = match &e {
            MachineError::Mapping(_)
            | MachineError::SmallerThanSnapshot { .. }
            | MachineError::BadMapping(_) => "InvalidBlockDeviceMapping",
            MachineError::ImageNotFound(_) | MachineError::ImageNotInBin(_) => {
                "InvalidAMIID.NotFound"
            }
            MachineError::ImageBinExpired(_) => "InvalidAMIID.Unavailable",
            MachineError::ImageIdMalformed(_) => "InvalidAMIID.Malformed",
            MachineError::ImageNotAvailable(..) => "InvalidAMIID.Unavailable",
            MachineError::InstanceNotFound(_) => "InvalidInstanceID.NotFound",
            MachineError::InstanceIdMalformed(_) => "InvalidInstanceID.Malformed",
            MachineError::NameTaken { .. } => "InvalidAMIName.Duplicate",
            MachineError::InvalidName(_) => "InvalidAMIName.Malformed",
            MachineError::InstanceType(_) | MachineError::Invalid(_) => "InvalidParameterValue",
            MachineError::IncorrectState { .. } => "IncorrectInstanceState",
            MachineError::SnapshotInUse { .. } => "InvalidSnapshot.InUse",
            MachineError::Unsupported(_) => "UnsupportedOperation",
            MachineError::Quiesce(_) => "IncorrectState",
            MachineError::Engine(_) => {
                let MachineError::Engine(inner) = e else {
                    unreachable!("matched just above")
                };
                return inner.into();
            }
        };
        Ec2Error::new(code, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse_form(form: &str) -> Ec2Result<Vec<BlockDeviceMapping>> {
        parse(
            &Params::parse("", form.as_bytes()).unwrap(),
            "BlockDeviceMapping",
        )
    }

    #[test]
    fn mappings_as_ec2_sends_them() {
        let m = parse_form(
            "BlockDeviceMapping.1.DeviceName=%2Fdev%2Fsda1&BlockDeviceMapping.1.Ebs.SnapshotId=snap-1&BlockDeviceMapping.1.Ebs.VolumeSize=20&BlockDeviceMapping.1.Ebs.DeleteOnTermination=false\
             &BlockDeviceMapping.2.DeviceName=%2Fdev%2Fsdb&BlockDeviceMapping.2.VirtualName=ephemeral0\
             &BlockDeviceMapping.3.DeviceName=%2Fdev%2Fsdc&BlockDeviceMapping.3.NoDevice=",
        )
        .unwrap();
        assert_eq!(m.len(), 3);
        let e = m[0].ebs.as_ref().unwrap();
        assert_eq!(e.snapshot_id.as_deref(), Some("snap-1"));
        assert_eq!(
            (e.volume_size, e.delete_on_termination),
            (Some(20), Some(false))
        );
        assert_eq!(m[1].virtual_name.as_deref(), Some("ephemeral0"));
        assert!(m[2].no_device);
    }

    #[test]
    fn a_given_type_is_held_to_its_limits() {
        let one = |ebs: &str| {
            parse_form(&format!(
                "BlockDeviceMapping.1.DeviceName=%2Fdev%2Fsdf&BlockDeviceMapping.1.Ebs.{ebs}"
            ))
        };
        assert!(one("VolumeSize=4&BlockDeviceMapping.1.Ebs.VolumeType=io1&BlockDeviceMapping.1.Ebs.Iops=100").is_ok());
        let e = one("VolumeSize=1&BlockDeviceMapping.1.Ebs.VolumeType=io1&BlockDeviceMapping.1.Ebs.Iops=100")
            .unwrap_err();
        assert_eq!(e.code, "InvalidParameterValue");
        let e = one("VolumeSize=8&BlockDeviceMapping.1.Ebs.VolumeType=gp2&BlockDeviceMapping.1.Ebs.Throughput=125")
            .unwrap_err();
        assert_eq!(e.code, "InvalidParameterCombination");
        assert!(one("VolumeSize=8&BlockDeviceMapping.1.Ebs.VolumeType=gp9").is_err());
        // Without a type nothing is assumed: a launch override may give
        // only DeleteOnTermination.
        assert!(one("DeleteOnTermination=true").is_ok());
    }

    #[test]
    fn refusals() {
        let code = |f: &str| parse_form(f).unwrap_err().code;
        assert_eq!(
            code(
                "BlockDeviceMapping.1.DeviceName=%2Fdev%2Fsdb&BlockDeviceMapping.1.VirtualName=ephemeral0&BlockDeviceMapping.1.Ebs.VolumeSize=1"
            ),
            "InvalidBlockDeviceMapping"
        );
        assert_eq!(
            code("BlockDeviceMapping.1.VirtualName=ephemeral0"),
            "InvalidBlockDeviceMapping"
        );
        assert_eq!(
            code("BlockDeviceMapping.1.DeviceName=bogus&BlockDeviceMapping.1.NoDevice="),
            "InvalidBlockDeviceMapping"
        );
        assert_eq!(
            code(
                "BlockDeviceMapping.1.DeviceName=%2Fdev%2Fsdb&BlockDeviceMapping.1.Ebs.Colour=red"
            ),
            "UnknownParameter"
        );
        assert_eq!(
            code(
                "BlockDeviceMapping.1.DeviceName=%2Fdev%2Fsdb&BlockDeviceMapping.1.Ebs.KmsKeyId=alias%2Fk&BlockDeviceMapping.1.Ebs.VolumeSize=1"
            ),
            "InvalidParameterDependency"
        );
        let m = parse_form(
            "BlockDeviceMapping.1.DeviceName=%2Fdev%2Fsdb&BlockDeviceMapping.1.Ebs.Encrypted=true&BlockDeviceMapping.1.Ebs.KmsKeyId=alias%2Fk&BlockDeviceMapping.1.Ebs.VolumeSize=1",
        )
        .unwrap();
        let e = m[0].ebs.as_ref().unwrap();
        assert_eq!(
            (e.encrypted, e.kms_key_id.as_deref()),
            (Some(true), Some("alias/k"))
        );
    }

    proptest! {
        #[test]
        fn arbitrary_forms_never_panic(form in "[A-Za-z0-9.=&%]{0,200}") {
            if let Ok(p) = Params::parse("", form.as_bytes()) {
                let _ = parse(&p, "BlockDeviceMapping");
            }
        }
    }
}
