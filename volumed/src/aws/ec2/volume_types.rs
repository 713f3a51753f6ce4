//! EBS volume types as EC2 states them: the sizes each allows, which of
//! `Iops` and `Throughput` it takes, and what DescribeVolumes reports for
//! them when the creator gave none. Figures are those of the EC2 API
//! reference for CreateVolume (botocore's 2016-11-15 model, 2026).

use super::{Ec2Error, Ec2Result};

/// The volume type a volume has when none was given.
pub const DEFAULT_TYPE: &str = "gp2";

/// One volume type's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VolumeType {
    pub name: &'static str,
    /// Sizes allowed, in GiB.
    pub min_gib: u64,
    pub max_gib: u64,
    /// Provisioned IOPS allowed; `None` when the type takes none.
    pub iops: Option<(u64, u64)>,
    /// Whether `Iops` must be given (io1, io2).
    pub iops_required: bool,
    /// Throughput allowed in MiB/s; `None` when the type takes none.
    pub throughput: Option<(u64, u64)>,
}

pub const TYPES: &[VolumeType] = &[
    VolumeType {
        name: "gp2",
        min_gib: 1,
        max_gib: 16 << 10,
        iops: None,
        iops_required: false,
        throughput: None,
    },
    VolumeType {
        name: "gp3",
        min_gib: 1,
        max_gib: 64 << 10,
        iops: Some((GP3_IOPS, 80_000)),
        iops_required: false,
        throughput: Some((GP3_THROUGHPUT, 2_000)),
    },
    VolumeType {
        name: "io1",
        min_gib: 4,
        max_gib: 16 << 10,
        iops: Some((100, 64_000)),
        iops_required: true,
        throughput: None,
    },
    VolumeType {
        name: "io2",
        min_gib: 4,
        max_gib: 64 << 10,
        iops: Some((100, 256_000)),
        iops_required: true,
        throughput: None,
    },
    VolumeType {
        name: "st1",
        min_gib: 125,
        max_gib: 16 << 10,
        iops: None,
        iops_required: false,
        throughput: None,
    },
    VolumeType {
        name: "sc1",
        min_gib: 125,
        max_gib: 16 << 10,
        iops: None,
        iops_required: false,
        throughput: None,
    },
    VolumeType {
        name: "standard",
        min_gib: 1,
        max_gib: 1 << 10,
        iops: None,
        iops_required: false,
        throughput: None,
    },
];

/// gp3's baseline, which it reports unless more was provisioned.
const GP3_IOPS: u64 = 3_000;
const GP3_THROUGHPUT: u64 = 125;
/// gp2's baseline: 3 IOPS per GiB, at least 100, at most 16,000.
const GP2_IOPS_PER_GIB: u64 = 3;
const GP2_MIN_IOPS: u64 = 100;
const GP2_MAX_IOPS: u64 = 16_000;

/// The type named `name`, or EC2's refusal.
pub fn lookup(name: &str) -> Ec2Result<&'static VolumeType> {
    TYPES.iter().find(|t| t.name == name).ok_or_else(|| {
        Ec2Error::invalid_value(
            "VolumeType",
            name,
            "Expecting one of standard, gp2, gp3, io1, io2, sc1, st1.",
        )
    })
}

impl VolumeType {
    /// Refuses a size this type does not allow, in EC2's words.
    pub fn check_size(&self, gib: u64) -> Ec2Result<()> {
        if gib < self.min_gib {
            return Err(Ec2Error::invalid_parameter(format!(
                "Volume of size {gib}GB is too small; minimum is {}GB.",
                self.min_gib
            )));
        }
        if gib > self.max_gib {
            return Err(Ec2Error::invalid_parameter(format!(
                "Volume of size {gib}GB is too large; maximum is {}GB.",
                self.max_gib
            )));
        }
        Ok(())
    }

    /// Refuses `Iops` and `Throughput` this type does not take or allow.
    pub fn check_performance(&self, iops: Option<u64>, throughput: Option<u64>) -> Ec2Result<()> {
        match (self.iops, iops) {
            (None, Some(_)) => {
                return Err(Ec2Error::new(
                    "InvalidParameterCombination",
                    format!(
                        "The parameter iops is not supported for {} volumes.",
                        self.name
                    ),
                ));
            }
            (Some(_), None) if self.iops_required => {
                return Err(Ec2Error::new(
                    "InvalidParameterCombination",
                    format!(
                        "The parameter iops must be specified for {} volumes.",
                        self.name
                    ),
                ));
            }
            (Some((lo, hi)), Some(n)) if !(lo..=hi).contains(&n) => {
                return Err(Ec2Error::invalid_parameter(format!(
                    "Volume iops of {n} is out of range for {} volumes: expecting {lo} to {hi}.",
                    self.name
                )));
            }
            _ => {}
        }
        match (self.throughput, throughput) {
            (None, Some(_)) => Err(Ec2Error::new(
                "InvalidParameterCombination",
                "throughput can only be specified for volumeType gp3.",
            )),
            (Some((lo, hi)), Some(n)) if !(lo..=hi).contains(&n) => {
                Err(Ec2Error::invalid_parameter(format!(
                    "Throughput of {n} MiB/s is out of range for {} volumes: expecting {lo} to {hi}.",
                    self.name
                )))
            }
            _ => Ok(()),
        }
    }
}

/// What DescribeVolumes reports as `Iops` and `Throughput` for a volume of
/// `volume_type` and `gib`, given what was provisioned: EC2 reports gp2's
/// baseline and gp3's defaults even when nothing was asked for, and
/// neither for st1, sc1 and standard.
pub fn reported(
    volume_type: &str,
    gib: u64,
    iops: Option<u64>,
    throughput: Option<u64>,
) -> (Option<u64>, Option<u64>) {
    match volume_type {
        "gp2" => (
            Some(
                gib.saturating_mul(GP2_IOPS_PER_GIB)
                    .clamp(GP2_MIN_IOPS, GP2_MAX_IOPS),
            ),
            None,
        ),
        "gp3" => (
            Some(iops.unwrap_or(GP3_IOPS)),
            Some(throughput.unwrap_or(GP3_THROUGHPUT)),
        ),
        "io1" | "io2" => (iops, None),
        _ => (None, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_per_type() {
        let size_ok = |t: &str, g: u64| lookup(t).unwrap().check_size(g).is_ok();
        for (t, lo, hi) in [
            ("gp2", 1, 16384),
            ("gp3", 1, 65536),
            ("io1", 4, 16384),
            ("io2", 4, 65536),
            ("st1", 125, 16384),
            ("sc1", 125, 16384),
            ("standard", 1, 1024),
        ] {
            assert!(size_ok(t, lo) && size_ok(t, hi), "{t}");
            assert!(!size_ok(t, lo - 1) && !size_ok(t, hi + 1), "{t}");
        }
        let e = lookup("io1").unwrap().check_size(1).unwrap_err();
        assert_eq!(e.code, "InvalidParameterValue");
        assert_eq!(
            e.message,
            "Volume of size 1GB is too small; minimum is 4GB."
        );
        assert_eq!(lookup("gp4").unwrap_err().code, "InvalidParameterValue");
    }

    #[test]
    fn performance_per_type() {
        let check = |t: &str, i, th| lookup(t).unwrap().check_performance(i, th);
        assert!(check("gp3", None, None).is_ok());
        assert!(check("gp3", Some(3000), Some(125)).is_ok());
        assert!(check("gp3", Some(2999), None).is_err());
        assert!(check("gp3", None, Some(2001)).is_err());
        assert!(check("io1", Some(100), None).is_ok());
        assert!(check("io2", Some(256_000), None).is_ok());
        assert!(check("io1", Some(64_001), None).is_err());
        let e = check("io1", None, None).unwrap_err();
        assert_eq!(e.code, "InvalidParameterCombination");
        assert_eq!(
            check("gp2", Some(300), None).unwrap_err().code,
            "InvalidParameterCombination"
        );
        assert_eq!(
            check("io2", Some(1000), Some(125)).unwrap_err().code,
            "InvalidParameterCombination"
        );
    }

    #[test]
    fn reported_performance() {
        assert_eq!(reported("gp2", 1, None, None), (Some(100), None));
        assert_eq!(reported("gp2", 100, None, None), (Some(300), None));
        assert_eq!(reported("gp2", 16384, None, None), (Some(16000), None));
        assert_eq!(reported("gp2", u64::MAX, None, None), (Some(16000), None));
        assert_eq!(reported("gp3", 8, None, None), (Some(3000), Some(125)));
        assert_eq!(
            reported("gp3", 8, Some(6000), Some(250)),
            (Some(6000), Some(250))
        );
        assert_eq!(reported("io2", 8, Some(500), None), (Some(500), None));
        for t in ["st1", "sc1", "standard"] {
            assert_eq!(reported(t, 500, None, None), (None, None));
        }
    }
}
