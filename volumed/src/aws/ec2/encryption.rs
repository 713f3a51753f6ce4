//! EC2's encryption actions: CopySnapshot, Enable-, Disable- and
//! GetEbsEncryptionByDefault, Get-, Modify- and ResetEbsDefaultKmsKeyId;
//! and the `Encrypted` and `KmsKeyId` parameters volumes take.
//!
//! Encryption by default is the store's: every volume of an encrypted store
//! is encrypted, none of an unencrypted one, so enabling it on one or
//! disabling it on the other is refused rather than pretended.

use std::collections::BTreeMap;

use super::params::Params;
use super::snapshots::{UNKNOWN_VOLUME, snapshot_id};
use super::xml::Xml;
use super::{Cx, Ec2Error, Ec2Result};
use crate::catalog::AwsSnapshotRecord;

/// `Encrypted` and `KmsKeyId`: a key requires `Encrypted=true`, as on AWS;
/// `Encrypted=false` changes nothing where encryption is by default.
pub fn params(p: &Params) -> Ec2Result<(Option<bool>, Option<String>)> {
    let encrypted = p.bool("Encrypted")?;
    let key = p.get("KmsKeyId").map(str::to_owned);
    if key.is_some() && encrypted != Some(true) {
        return Err(Ec2Error::new(
            "InvalidParameterDependency",
            "The parameter KmsKeyId requires the parameter Encrypted to be set.",
        ));
    }
    Ok((encrypted.filter(|e| *e), key))
}

/// Copies a snapshot of this region: with the source's key a copy sharing
/// its chunks, with another `KmsKeyId` a full copy sealed under that key.
pub async fn copy_snapshot(cx: Cx<'_>) -> Ec2Result<String> {
    cx.only(&[
        "SourceSnapshotId",
        "SourceRegion",
        "DestinationRegion",
        "PresignedUrl",
        "Encrypted",
        "KmsKeyId",
        "Description",
        "TagSpecification",
    ])?;
    let p = cx.p;
    let region = p.required("SourceRegion")?;
    if region != cx.state.region {
        return Err(Ec2Error::invalid_value(
            "SourceRegion",
            region,
            &format!("This host is region {}.", cx.state.region),
        ));
    }
    // awscli fills these in for a copy within a region; a presigned URL
    // matters only across regions, which one host has not.
    if let Some(r) = p.get("DestinationRegion")
        && r != cx.state.region
    {
        return Err(Ec2Error::invalid_value(
            "DestinationRegion",
            r,
            &format!("This host is region {}.", cx.state.region),
        ));
    }
    let source = snapshot_id(p.required("SourceSnapshotId")?)?;
    let (_, key) = params(p)?;
    let description = p.get("Description").unwrap_or("").to_owned();
    if description.chars().count() > 255 || description.chars().any(char::is_control) {
        return Err(Ec2Error::invalid_value(
            "Description",
            &description,
            "Expecting at most 255 printable characters.",
        ));
    }
    let tags = p.tag_specifications("snapshot")?;
    volumed_api::validate_tags(&tags).map_err(|e| Ec2Error::invalid_parameter(e.to_string()))?;
    let rec = cx
        .state
        .engine
        .copy_snapshot(&source, key.as_deref(), BTreeMap::new())
        .await?;
    let meta = AwsSnapshotRecord {
        volume_id: Some(UNKNOWN_VOLUME.to_owned()),
        description,
        tags: tags.clone(),
    };
    cx.state.attrs.put_snapshot(&rec.id, &meta).await?;
    let mut x = Xml::response("CopySnapshot", cx.rid);
    x.elem("snapshotId", rec.id.as_str()).tag_set(&tags);
    Ok(x.finish("CopySnapshot"))
}

/// Get (`set` None), Enable (`Some(true)`) or Disable (`Some(false)`)
/// EbsEncryptionByDefault.
pub async fn by_default(cx: Cx<'_>, set: Option<bool>) -> Ec2Result<String> {
    cx.only(&[])?;
    let on = cx.state.engine.store_encrypted();
    match set {
        Some(true) if !on => {
            return Err(Ec2Error::new(
                "UnsupportedOperation",
                "The store is not encrypted; encryption is chosen when a store is created (volumed --store-encryption on).",
            ));
        }
        Some(false) if on => {
            return Err(Ec2Error::new(
                "UnsupportedOperation",
                "The store is encrypted: every volume in it is.",
            ));
        }
        _ => {}
    }
    let action = match set {
        Some(true) => "EnableEbsEncryptionByDefault",
        Some(false) => "DisableEbsEncryptionByDefault",
        None => "GetEbsEncryptionByDefault",
    };
    let mut x = Xml::response(action, cx.rid);
    x.elem("ebsEncryptionByDefault", on);
    Ok(x.finish(action))
}

/// Get (`set` None), Modify (`Some(true)`) or Reset (`Some(false)`)
/// EbsDefaultKmsKeyId: the key volumes that name none are sealed under.
pub async fn default_key(cx: Cx<'_>, set: Option<bool>) -> Ec2Result<String> {
    let keys = cx.state.engine.keys()?;
    let (action, k) = match set {
        None => {
            cx.only(&[])?;
            ("GetEbsDefaultKmsKeyId", keys.default_key().await)
        }
        Some(true) => {
            cx.only(&["KmsKeyId"])?;
            let want = cx.p.required("KmsKeyId")?;
            (
                "ModifyEbsDefaultKmsKeyId",
                keys.set_default(Some(want)).await,
            )
        }
        Some(false) => {
            cx.only(&[])?;
            ("ResetEbsDefaultKmsKeyId", keys.set_default(None).await)
        }
    };
    let k = k.map_err(crate::engine::Error::from)?;
    let mut x = Xml::response(action, cx.rid);
    x.elem("kmsKeyId", &k.arn);
    Ok(x.finish(action))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_needs_encrypted_and_false_defers_to_the_default() {
        let p = Params::parse("Encrypted=true&KmsKeyId=alias/x", b"").unwrap();
        assert_eq!(params(&p).unwrap(), (Some(true), Some("alias/x".into())));
        let p = Params::parse("KmsKeyId=alias/x", b"").unwrap();
        assert_eq!(params(&p).unwrap_err().code, "InvalidParameterDependency");
        let p = Params::parse("Encrypted=false", b"").unwrap();
        assert_eq!(params(&p).unwrap(), (None, None));
    }
}
