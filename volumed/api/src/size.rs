//! Byte sizes as people type them (`10G`, `10GiB`, `512K`, `1T`) and as they
//! read them back (`10 GiB`). Units are always binary, like EBS's "GiB".

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("size is empty")]
    Empty,
    #[error("size {0:?} is not a number with an optional unit (K, M, G, T, P or KiB .. PiB)")]
    Malformed(String),
    #[error("unknown size unit {unit:?} in {input:?}; use K, M, G, T, P (binary) or KiB .. PiB")]
    UnknownUnit { input: String, unit: String },
    #[error("size {0:?} does not fit in 64 bits")]
    Overflow(String),
}

/// Parses a byte count with an optional binary unit. Whitespace around the
/// number and between number and unit is allowed; fractions are not, so every
/// accepted value is an exact byte count.
pub fn parse_size(input: &str) -> Result<u64, SizeError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(SizeError::Empty);
    }
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(digits_end);
    if num.is_empty() {
        return Err(SizeError::Malformed(input.to_owned()));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| SizeError::Overflow(input.to_owned()))?;
    let shift = match unit.trim() {
        "" | "B" | "b" => 0,
        "K" | "k" | "KiB" | "kiB" => 10,
        "M" | "m" | "MiB" => 20,
        "G" | "g" | "GiB" => 30,
        "T" | "t" | "TiB" => 40,
        "P" | "p" | "PiB" => 50,
        u if u.chars().all(|c| c.is_ascii_alphabetic()) => {
            return Err(SizeError::UnknownUnit {
                input: input.to_owned(),
                unit: u.to_owned(),
            });
        }
        _ => return Err(SizeError::Malformed(input.to_owned())),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| SizeError::Overflow(input.to_owned()))
}

/// Formats bytes for people: the largest binary unit that keeps at least one
/// whole unit, one decimal when it is not exact (`1.5 GiB`, `512 KiB`, `100 B`).
pub fn format_size(bytes: u64) -> String {
    HumanSize(bytes).to_string()
}

struct HumanSize(u64);

impl fmt::Display for HumanSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
        let b = self.0;
        if b < 1024 {
            return write!(f, "{b} B");
        }
        let mut shift = 10;
        let mut idx = 0;
        while idx + 1 < UNITS.len() && b >> (shift + 10) > 0 {
            shift += 10;
            idx += 1;
        }
        let unit = 1u64 << shift;
        if b.is_multiple_of(unit) {
            write!(f, "{} {}", b / unit, UNITS[idx])
        } else {
            write!(f, "{:.1} {}", b as f64 / unit as f64, UNITS[idx])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_the_documented_forms() {
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size(" 2 MiB "), Ok(2 << 20));
        assert_eq!(parse_size("0"), Ok(0));
    }

    #[test]
    fn rejects_bad_input_with_a_reason() {
        assert!(matches!(
            parse_size("10Q"),
            Err(SizeError::UnknownUnit { .. })
        ));
        assert!(matches!(
            parse_size("10GB"),
            Err(SizeError::UnknownUnit { .. })
        ));
        assert!(matches!(parse_size("G"), Err(SizeError::Malformed(_))));
        assert!(matches!(parse_size("-1"), Err(SizeError::Malformed(_))));
        assert!(matches!(parse_size("1.5G"), Err(SizeError::Malformed(_))));
        assert_eq!(parse_size(""), Err(SizeError::Empty));
        assert!(matches!(
            parse_size("99999999999999999999"),
            Err(SizeError::Overflow(_))
        ));
        assert!(matches!(parse_size("16384P"), Err(SizeError::Overflow(_))));
    }

    #[test]
    fn formats_binary_units() {
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(1023), "1023 B");
        assert_eq!(format_size(1024), "1 KiB");
        assert_eq!(format_size(10 << 30), "10 GiB");
        assert_eq!(format_size(3 << 29), "1.5 GiB");
        assert_eq!(format_size(64 << 40), "64 TiB");
        assert_eq!(format_size(u64::MAX), "16.0 EiB");
    }

    proptest! {
        #[test]
        fn never_panics(s in ".{0,40}") {
            let _ = parse_size(&s);
        }

        #[test]
        fn round_trips_whole_units(n in 0u64..1_000_000, unit in 0usize..5) {
            let suffix = ["K", "M", "G", "T", "P"][unit];
            let expect = n.checked_mul(1 << (10 * (unit + 1)));
            prop_assert_eq!(parse_size(&format!("{n}{suffix}")).ok(), expect);
        }
    }
}
