//! EC2 Query parameters: a form (`POST /`, `application/x-www-form-urlencoded`)
//! or a query string (`GET /?Action=...`), flattened EC2-style: lists are
//! `Name.N`, structures `Name.N.Field`, filters `Filter.N.Name` with
//! `Filter.N.Value.M`. Pure parsing; the numbers N need not be contiguous
//! but are read in ascending order, and each kind of list is capped.

use std::collections::BTreeMap;

use super::Ec2Error;

/// More list members than this in one request is refused (EC2 caps most
/// lists at 1000 or fewer).
pub const MAX_LIST: usize = 1000;
/// The parameters a request may carry at all.
const MAX_PARAMS: usize = 10_000;

#[derive(Debug, Clone, Default)]
pub struct Params {
    map: BTreeMap<String, String>,
}

impl Params {
    /// The form body's and the query string's parameters together; the
    /// query's signing parameters (`X-Amz-*`) are not parameters.
    pub fn parse(query: &str, form: &[u8]) -> Result<Self, Ec2Error> {
        let mut map = BTreeMap::new();
        let pairs = form_urlencoded::parse(query.as_bytes()).chain(form_urlencoded::parse(form));
        for (k, v) in pairs {
            if k.starts_with("X-Amz-") {
                continue;
            }
            if map.len() >= MAX_PARAMS {
                return Err(Ec2Error::invalid_parameter("too many parameters"));
            }
            if map.insert(k.to_string(), v.to_string()).is_some() {
                return Err(Ec2Error::invalid_parameter(format!(
                    "parameter {k} is given twice"
                )));
            }
        }
        Ok(Params { map })
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.map.get(name).map(String::as_str)
    }

    pub fn required(&self, name: &str) -> Result<&str, Ec2Error> {
        self.get(name).ok_or_else(|| Ec2Error::missing(name))
    }

    pub fn bool(&self, name: &str) -> Result<Option<bool>, Ec2Error> {
        match self.get(name) {
            None => Ok(None),
            Some(v) if v.eq_ignore_ascii_case("true") => Ok(Some(true)),
            Some(v) if v.eq_ignore_ascii_case("false") => Ok(Some(false)),
            Some(v) => Err(Ec2Error::invalid_value(name, v, "expected true or false")),
        }
    }

    pub fn u64(&self, name: &str) -> Result<Option<u64>, Ec2Error> {
        self.get(name)
            .map(|v| {
                v.parse::<u64>()
                    .map_err(|_| Ec2Error::invalid_value(name, v, "expected a whole number"))
            })
            .transpose()
    }

    /// The N of every `prefix.N` or `prefix.N.rest` parameter, ascending.
    pub fn indices(&self, prefix: &str) -> Result<Vec<u64>, Ec2Error> {
        let dotted = format!("{prefix}.");
        let mut out: Vec<u64> = Vec::new();
        for k in self.map.keys() {
            let Some(rest) = k.strip_prefix(&dotted) else {
                continue;
            };
            let n = rest.split('.').next().unwrap_or("");
            let n: u64 = n
                .parse()
                .ok()
                .filter(|n| *n >= 1)
                .ok_or_else(|| Ec2Error::invalid_parameter(format!("bad list index in {k}")))?;
            out.push(n);
        }
        out.sort_unstable();
        out.dedup();
        if out.len() > MAX_LIST {
            return Err(Ec2Error::invalid_parameter(format!(
                "{prefix} has more than {MAX_LIST} members"
            )));
        }
        Ok(out)
    }

    /// `prefix.1`, `prefix.2`, ...: a list of values.
    pub fn list(&self, prefix: &str) -> Result<Vec<String>, Ec2Error> {
        self.indices(prefix)?
            .into_iter()
            .map(|n| {
                let k = format!("{prefix}.{n}");
                self.get(&k)
                    .map(str::to_owned)
                    .ok_or_else(|| Ec2Error::invalid_parameter(format!("{k} has no value")))
            })
            .collect()
    }

    /// `Filter.N.Name` and `Filter.N.Value.M`.
    pub fn filters(&self) -> Result<Vec<(String, Vec<String>)>, Ec2Error> {
        self.indices("Filter")?
            .into_iter()
            .map(|n| {
                let name = self.required(&format!("Filter.{n}.Name"))?.to_owned();
                let values = self.list(&format!("Filter.{n}.Value"))?;
                Ok((name, values))
            })
            .collect()
    }

    /// `Tag.N.Key` and `Tag.N.Value` under `prefix` (value optional).
    pub fn tags(&self, prefix: &str) -> Result<Vec<(String, Option<String>)>, Ec2Error> {
        self.indices(prefix)?
            .into_iter()
            .map(|n| {
                let key = self.required(&format!("{prefix}.{n}.Key"))?.to_owned();
                let value = self.get(&format!("{prefix}.{n}.Value")).map(str::to_owned);
                Ok((key, value))
            })
            .collect()
    }

    /// Tags as a map (a missing value is empty, as EC2's CreateTags).
    pub fn tag_map(&self, prefix: &str) -> Result<BTreeMap<String, String>, Ec2Error> {
        let mut out = BTreeMap::new();
        for (k, v) in self.tags(prefix)? {
            if out.insert(k.clone(), v.unwrap_or_default()).is_some() {
                return Err(Ec2Error::invalid_parameter(format!(
                    "tag {k:?} is given twice"
                )));
            }
        }
        Ok(out)
    }

    /// `TagSpecification.N.ResourceType` with its `Tag.M`: the tags for
    /// `resource` (`volume`, `snapshot`); others are refused.
    pub fn tag_specifications(&self, resource: &str) -> Result<BTreeMap<String, String>, Ec2Error> {
        let mut out = BTreeMap::new();
        for n in self.indices("TagSpecification")? {
            let t = self.required(&format!("TagSpecification.{n}.ResourceType"))?;
            if t != resource {
                return Err(Ec2Error::invalid_value(
                    "TagSpecification.ResourceType",
                    t,
                    "this action tags only what it creates",
                ));
            }
            out.extend(self.tag_map(&format!("TagSpecification.{n}.Tag"))?);
        }
        Ok(out)
    }

    /// `BlockDeviceMapping.N.DeviceName` with `.Ebs.DeleteOnTermination`.
    pub fn block_device_mappings(&self) -> Result<Vec<(String, Option<bool>)>, Ec2Error> {
        self.indices("BlockDeviceMapping")?
            .into_iter()
            .map(|n| {
                let dev = self
                    .required(&format!("BlockDeviceMapping.{n}.DeviceName"))?
                    .to_owned();
                let dot = self.bool(&format!("BlockDeviceMapping.{n}.Ebs.DeleteOnTermination"))?;
                Ok((dev, dot))
            })
            .collect()
    }

    /// The rest of every parameter name that starts with `prefix`.
    pub fn keys_under<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.map
            .range::<str, _>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .map(|(k, _)| k.as_str())
            .take_while(move |k| k.starts_with(prefix))
            .map(move |k| &k[prefix.len()..])
    }

    /// Names of parameters not among `known` (exactly or as a `X.` prefix),
    /// so an unsupported option is refused rather than ignored.
    pub fn unknown(&self, known: &[&str]) -> Option<&str> {
        self.map.keys().map(String::as_str).find(|k| {
            !known
                .iter()
                .any(|n| k == n || k.strip_prefix(n).is_some_and(|rest| rest.starts_with('.')))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn lists_filters_tags() {
        let p = Params::parse(
            "Action=DescribeVolumes",
            b"VolumeId.2=vol-b&VolumeId.1=vol-a&Filter.1.Name=tag%3AName&Filter.1.Value.1=a+b&Filter.1.Value.2=c&Filter.10.Name=status&Filter.10.Value.1=in-use&Tag.1.Key=k&Tag.1.Value=v&Tag.2.Key=e",
        )
        .unwrap();
        assert_eq!(p.get("Action"), Some("DescribeVolumes"));
        assert_eq!(p.list("VolumeId").unwrap(), ["vol-a", "vol-b"]);
        let f = p.filters().unwrap();
        assert_eq!(f[0], ("tag:Name".into(), vec!["a b".into(), "c".into()]));
        assert_eq!(f[1].0, "status");
        let t = p.tag_map("Tag").unwrap();
        assert_eq!(t.get("e").map(String::as_str), Some(""));
        assert_eq!(
            p.unknown(&["Action", "VolumeId", "Filter"]),
            Some("Tag.1.Key")
        );
        assert_eq!(p.unknown(&["Action", "VolumeId", "Filter", "Tag"]), None);
    }

    #[test]
    fn bad_parameters() {
        assert!(Params::parse("", b"A=1&A=2").is_err());
        let p = Params::parse("", b"VolumeId.0=x").unwrap();
        assert!(p.list("VolumeId").is_err());
        let p = Params::parse("", b"VolumeId.x=x").unwrap();
        assert!(p.list("VolumeId").is_err());
        let p = Params::parse("", b"Filter.1.Value.1=x").unwrap();
        assert!(p.filters().is_err(), "a filter needs a name");
        let p = Params::parse("", b"Size=ten").unwrap();
        assert!(p.u64("Size").is_err());
        let many: String = (1..=1001).map(|i| format!("VolumeId.{i}=v&")).collect();
        let p = Params::parse("", many.as_bytes()).unwrap();
        assert!(p.list("VolumeId").is_err());
        let p = Params::parse("X-Amz-Signature=abc&Action=A", b"").unwrap();
        assert_eq!(p.unknown(&["Action"]), None);
    }

    proptest! {
        #[test]
        fn arbitrary_forms_never_panic(form in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(p) = Params::parse("", &form) {
                let _ = p.filters();
                let _ = p.list("VolumeId");
                let _ = p.tag_specifications("volume");
                let _ = p.block_device_mappings();
            }
        }
    }
}
