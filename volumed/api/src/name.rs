//! Volume names: the one place a name is checked before it may reach a file
//! path, an NBD export list or the catalog.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

/// Longest name accepted, in bytes (like EBS tag values, short enough for logs).
pub const MAX_NAME_LEN: usize = 64;

/// A validated volume name: 1 to 64 of `[A-Za-z0-9._-]`, not starting with
/// `.` or `-`. Such a name can never be `..`, contain `/`, or look like a flag.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct VolumeName(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("name is empty")]
    Empty,
    #[error("name is longer than {MAX_NAME_LEN} characters")]
    TooLong,
    #[error("name must not start with '{0}'")]
    BadStart(char),
    #[error("name contains {0:?}; allowed are A-Z a-z 0-9 . _ -")]
    BadChar(char),
}

impl VolumeName {
    pub fn parse(s: &str) -> Result<Self, NameError> {
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        if s.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong);
        }
        if let Some(c) = s.chars().find(|c| !is_name_char(*c)) {
            return Err(NameError::BadChar(c));
        }
        let first = s.as_bytes()[0] as char;
        if first == '.' || first == '-' {
            return Err(NameError::BadStart(first));
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

impl fmt::Display for VolumeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for VolumeName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl<'de> Deserialize<'de> for VolumeName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        VolumeName::parse(&s)
            .map_err(|e| serde::de::Error::custom(format!("invalid volume name {s:?}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_ordinary_names() {
        for n in [
            "data",
            "web-1",
            "db_2.img",
            "A",
            "x".repeat(64).as_str(),
            "0",
        ] {
            assert!(VolumeName::parse(n).is_ok(), "{n}");
        }
    }

    #[test]
    fn rejects_paths_flags_and_oddities() {
        assert_eq!(VolumeName::parse(""), Err(NameError::Empty));
        assert_eq!(VolumeName::parse("../x"), Err(NameError::BadChar('/')));
        assert_eq!(VolumeName::parse(".."), Err(NameError::BadStart('.')));
        assert_eq!(VolumeName::parse(".hidden"), Err(NameError::BadStart('.')));
        assert_eq!(VolumeName::parse("-rf"), Err(NameError::BadStart('-')));
        assert_eq!(VolumeName::parse("a b"), Err(NameError::BadChar(' ')));
        assert_eq!(VolumeName::parse("é"), Err(NameError::BadChar('é')));
        assert_eq!(VolumeName::parse(&"x".repeat(65)), Err(NameError::TooLong));
        assert_eq!(VolumeName::parse("a\0"), Err(NameError::BadChar('\0')));
    }

    #[test]
    fn deserialize_validates() {
        assert!(serde_json::from_str::<VolumeName>("\"../x\"").is_err());
        assert_eq!(
            serde_json::from_str::<VolumeName>("\"ok\"")
                .unwrap()
                .as_str(),
            "ok"
        );
    }

    proptest! {
        #[test]
        fn any_accepted_name_is_a_safe_path_component(s in ".{0,80}") {
            if let Ok(n) = VolumeName::parse(&s) {
                prop_assert!(!n.as_str().contains('/'));
                prop_assert!(!n.as_str().starts_with('.'));
                prop_assert!(n.as_str().len() <= MAX_NAME_LEN);
            }
        }
    }
}
