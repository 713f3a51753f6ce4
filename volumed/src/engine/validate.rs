//! The rules for what a request may ask for: sizes, chunk sizes, instance
//! ids and snapshot labels. Pure checks, so the engine applies each rule in
//! one place and tests can cover the edges.

use std::collections::BTreeMap;

use volumed_api::{
    MAX_CHUNK_SIZE, MAX_INSTANCE_LEN, MAX_VOLUME_SIZE, MIN_CHUNK_SIZE, SIZE_ALIGNMENT, format_size,
};

use crate::engine::error::{Error, Result};

/// Labels a snapshot may carry, and their key and value limits (EBS tags
/// allow 50 per resource).
const MAX_LABELS: usize = 50;
const MAX_LABEL_KEY: usize = 128;
const MAX_LABEL_VALUE: usize = 256;

pub fn size(size: u64) -> Result<()> {
    if size == 0 {
        return Err(Error::InvalidSize("size must be greater than 0".into()));
    }
    if !size.is_multiple_of(SIZE_ALIGNMENT) {
        return Err(Error::InvalidSize(format!(
            "size {size} is not a multiple of {SIZE_ALIGNMENT} bytes"
        )));
    }
    if size > MAX_VOLUME_SIZE {
        return Err(Error::InvalidSize(format!(
            "size {} exceeds the maximum volume size of {}",
            format_size(size),
            format_size(MAX_VOLUME_SIZE)
        )));
    }
    Ok(())
}

pub fn chunk_size(c: u64) -> Result<()> {
    if !c.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&c) {
        return Err(Error::InvalidSize(format!(
            "chunk size {c} must be a power of two from {} to {}",
            format_size(MIN_CHUNK_SIZE),
            format_size(MAX_CHUNK_SIZE)
        )));
    }
    Ok(())
}

pub fn instance(i: &str) -> Result<()> {
    if i.is_empty() || i.len() > MAX_INSTANCE_LEN || i.chars().any(char::is_control) {
        return Err(Error::InvalidRequest(format!(
            "instance id must be 1 to {MAX_INSTANCE_LEN} printable characters"
        )));
    }
    Ok(())
}

pub fn labels(labels: &BTreeMap<String, String>) -> Result<()> {
    if labels.len() > MAX_LABELS {
        return Err(Error::InvalidLabel(
            format!("{} labels", labels.len()),
            "at most 50 labels",
        ));
    }
    for (k, v) in labels {
        let key_ok = (1..=MAX_LABEL_KEY).contains(&k.len())
            && k.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/' | b':')
            });
        if !key_ok {
            return Err(Error::InvalidLabel(
                k.clone(),
                "keys are 1 to 128 of A-Z a-z 0-9 . _ - / :",
            ));
        }
        if v.len() > MAX_LABEL_VALUE || v.chars().any(char::is_control) {
            return Err(Error::InvalidLabel(
                k.clone(),
                "values are at most 256 printable characters",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edges() {
        assert!(size(0).is_err());
        assert!(size(511).is_err());
        assert!(size(512).is_ok());
        assert!(size(MAX_VOLUME_SIZE).is_ok());
        assert!(size(MAX_VOLUME_SIZE + 512).is_err());
        assert!(size(u64::MAX).is_err());
        assert!(chunk_size(MIN_CHUNK_SIZE).is_ok());
        assert!(chunk_size(MAX_CHUNK_SIZE).is_ok());
        assert!(chunk_size(MIN_CHUNK_SIZE / 2).is_err());
        assert!(chunk_size(MAX_CHUNK_SIZE * 2).is_err());
        assert!(chunk_size(3 << 16).is_err());
        assert!(chunk_size(0).is_err());
        assert!(instance("i-0123").is_ok());
        assert!(instance("").is_err());
        assert!(instance("a\nb").is_err());
        assert!(instance(&"x".repeat(MAX_INSTANCE_LEN + 1)).is_err());
        let mut l = BTreeMap::new();
        l.insert("team/app:tier".to_string(), "web".to_string());
        assert!(labels(&l).is_ok());
        l.insert("bad key".into(), "v".into());
        assert!(labels(&l).is_err());
        let mut l = BTreeMap::new();
        l.insert("k".into(), "v\u{7}".into());
        assert!(labels(&l).is_err());
        let many: BTreeMap<_, _> = (0..51).map(|i| (format!("k{i}"), String::new())).collect();
        assert!(labels(&many).is_err());
    }
}
