//! The instance-type table: how many instance-store volumes each type has
//! and how large, as AWS lists them. Built in with AWS-like defaults;
//! `--instance-types FILE` replaces it. The file has one type per line,
//!
//! ```text
//! # comments and blank lines are ignored
//! m5d.large  = 1 x 75GiB
//! m3.xlarge  = 2 x 40GiB
//! t3.micro   = none
//! ```
//!
//! Sizes as `vol` reads them (`75G`, `75GiB`, `512M`); `none` (or `0`)
//! for a type without instance store.

use std::collections::BTreeMap;

use volumed_api::{MAX_EPHEMERAL, parse_size};

/// The built-in table: common types of each family with their instance
/// store as AWS lists it (sizes in GB there, GiB here).
pub const DEFAULT_TABLE: &str = "\
# Without instance store.
t2.micro = none
t2.small = none
t2.medium = none
t3.nano = none
t3.micro = none
t3.small = none
t3.medium = none
t3.large = none
m5.large = none
m5.xlarge = none
c5.large = none
r5.large = none
t4g.micro = none
m6g.large = none
# With instance store.
m1.small = 1 x 160GiB
m3.medium = 1 x 4GiB
m3.large = 1 x 32GiB
m3.xlarge = 2 x 40GiB
m5d.large = 1 x 75GiB
m5d.xlarge = 1 x 150GiB
m5d.2xlarge = 1 x 300GiB
m5d.4xlarge = 2 x 300GiB
c5d.large = 1 x 50GiB
c5d.xlarge = 1 x 100GiB
r5d.large = 1 x 75GiB
i3.large = 1 x 475GiB
i3.xlarge = 1 x 950GiB
";

/// The type an instance gets when RunInstances names none (EC2's default).
pub const DEFAULT_TYPE: &str = "m1.small";

/// What one type has of instance store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstanceStore {
    pub count: u32,
    /// Bytes per volume.
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceTypes {
    types: BTreeMap<String, InstanceStore>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    #[error("line {line}: {why}")]
    Line { line: usize, why: String },
    #[error("the table names no instance type")]
    Empty,
}

impl InstanceTypes {
    pub fn builtin() -> Self {
        Self::parse(DEFAULT_TABLE).expect("the built-in table parses (see the unit test)")
    }

    pub fn parse(text: &str) -> Result<Self, TableError> {
        let mut types = BTreeMap::new();
        for (n, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let bad = |why: String| TableError::Line { line: n + 1, why };
            let (name, spec) = line.split_once('=').ok_or_else(|| {
                bad(format!(
                    "{line:?} is not TYPE = COUNT x SIZE or TYPE = none"
                ))
            })?;
            let name = name.trim();
            let name_ok = (1..=64).contains(&name.len())
                && name.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-')
                });
            if !name_ok {
                return Err(bad(format!("invalid instance type name {name:?}")));
            }
            let spec = spec.trim();
            let store = if spec == "none" || spec == "0" {
                InstanceStore { count: 0, size: 0 }
            } else {
                let (count, size) = spec
                    .split_once(['x', 'X', '*'])
                    .ok_or_else(|| bad(format!("{spec:?} is not COUNT x SIZE")))?;
                let count: u32 = count
                    .trim()
                    .parse()
                    .ok()
                    .filter(|c| *c <= MAX_EPHEMERAL + 1)
                    .ok_or_else(|| bad(format!("count {count:?} is not 0 to 24")))?;
                let size = parse_size(size.trim()).map_err(|e| bad(e.to_string()))?;
                if size == 0 || size % 512 != 0 || size > volumed_api::MAX_VOLUME_SIZE {
                    return Err(bad(format!(
                        "size {size} must be a multiple of 512 bytes up to 64 TiB"
                    )));
                }
                InstanceStore { count, size }
            };
            if types.insert(name.to_owned(), store).is_some() {
                return Err(bad(format!("instance type {name} is listed twice")));
            }
        }
        if types.is_empty() {
            return Err(TableError::Empty);
        }
        Ok(InstanceTypes { types })
    }

    pub fn get(&self, name: &str) -> Option<InstanceStore> {
        self.types.get(name).copied()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.types.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_table() {
        let t = InstanceTypes::builtin();
        assert_eq!(
            t.get("m5d.large"),
            Some(InstanceStore {
                count: 1,
                size: 75 << 30
            })
        );
        assert_eq!(t.get("t3.micro").map(|s| s.count), Some(0));
        assert!(t.get(DEFAULT_TYPE).is_some());
        assert!(t.get("x9.huge").is_none());
    }

    #[test]
    fn refusals() {
        for bad in [
            "m5d.large",
            "m5d.large = 1 x",
            "m5d.large = 25 x 1G",
            "m5d.large = 1 x 0",
            "M5 = none",
            "a = none\na = none",
            "# only a comment",
            "a = 1 x 1000",
        ] {
            assert!(InstanceTypes::parse(bad).is_err(), "{bad:?}");
        }
        let t = InstanceTypes::parse("t.test = 2 x 64MiB # small\n").unwrap();
        assert_eq!(
            t.get("t.test").map(|s| (s.count, s.size)),
            Some((2, 64 << 20))
        );
    }
}
