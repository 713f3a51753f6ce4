//! The Data Lifecycle Manager API: REST/JSON signed for `dlm`. A DLM
//! policy is a lifecycle policy named by its id (`policy-` and 17 hex
//! digits), `source` `dlm`; the scheduler runs it like any other.
//!
//! | method | path | action |
//! | --- | --- | --- |
//! | POST | /policies | CreateLifecyclePolicy |
//! | GET | /policies | GetLifecyclePolicies |
//! | GET | /policies/{id} | GetLifecyclePolicy |
//! | PATCH | /policies/{id} | UpdateLifecyclePolicy |
//! | DELETE | /policies/{id} | DeleteLifecyclePolicy |
//!
//! Only `EBS_SNAPSHOT_MANAGEMENT` with `CreateRule` (Interval in hours
//! with Times, or CronExpression), `RetainRule` (Count, or Interval with
//! its unit), `TargetTags`, `TagsToAdd` and `CopyTags`. Every other rule
//! kind is refused by name.

use std::collections::BTreeMap;

use hyper::Method;
use serde_json::{Value, json};
use volumed_api::{PolicySpec, PolicyTarget, Retention, ScheduleSpec, TagMatch};

use super::ebs::{EbsError, json_response};
use super::{AwsState, OWNER_ID, Request, Response};
use crate::catalog::PolicyRecord;
use crate::lifecycle::LifecycleError;
use crate::lifecycle::policy::Source;

type DlmResult<T> = Result<T, EbsError>;

fn invalid(message: impl Into<String>) -> EbsError {
    EbsError {
        kind: "InvalidRequestException",
        status: 400,
        reason: None,
        message: message.into(),
    }
}

fn not_found(id: &str) -> EbsError {
    EbsError {
        kind: "ResourceNotFoundException",
        status: 404,
        reason: None,
        message: format!("Policy {id} not found"),
    }
}

fn lc_err(e: LifecycleError) -> EbsError {
    match e {
        LifecycleError::PolicyNotFound(id) => not_found(&id),
        LifecycleError::Engine(e) => e.into(),
        LifecycleError::Catalog(e) => e.into(),
        e => invalid(volumed_api::error_chain(&e)),
    }
}

/// The keys of `v` not among `known`, refused by name.
fn only(v: &Value, what: &str, known: &[&str]) -> DlmResult<()> {
    if let Some(o) = v.as_object() {
        for k in o.keys() {
            if !known.contains(&k.as_str()) {
                return Err(invalid(format!(
                    "{what}.{k} is not supported by this endpoint"
                )));
            }
        }
    } else if !v.is_null() {
        return Err(invalid(format!("{what} must be an object")));
    }
    Ok(())
}

fn tags(v: &Value, what: &str) -> DlmResult<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for t in v.as_array().map(Vec::as_slice).unwrap_or_default() {
        let (Some(k), Some(val)) = (t["Key"].as_str(), t["Value"].as_str()) else {
            return Err(invalid(format!("{what}: each tag has a Key and a Value")));
        };
        out.insert(k.to_owned(), val.to_owned());
    }
    Ok(out)
}

fn hhmm(s: &str) -> DlmResult<u64> {
    let bad = || invalid(format!("Times {s:?}: expected hh:mm in UTC"));
    let (h, m) = s.split_once(':').ok_or_else(bad)?;
    let (h, m): (u64, u64) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if h > 23 || m > 59 {
        return Err(bad());
    }
    Ok(h * 3600 + m * 60)
}

fn schedule(s: &Value) -> DlmResult<ScheduleSpec> {
    only(
        s,
        "Schedules",
        &["Name", "CopyTags", "TagsToAdd", "CreateRule", "RetainRule"],
    )?;
    let name = s["Name"].as_str().unwrap_or("Schedule").to_owned();
    let create = &s["CreateRule"];
    only(
        create,
        "CreateRule",
        &[
            "Interval",
            "IntervalUnit",
            "Times",
            "CronExpression",
            "Location",
        ],
    )?;
    if create["Location"].as_str().is_some_and(|l| l != "CLOUD") {
        return Err(invalid("CreateRule.Location: only CLOUD"));
    }
    let (every, offset, cron) = match (
        create["Interval"].as_u64(),
        create["CronExpression"].as_str(),
    ) {
        (Some(h), None) => {
            if create["IntervalUnit"].as_str().unwrap_or("HOURS") != "HOURS" {
                return Err(invalid("CreateRule.IntervalUnit must be HOURS"));
            }
            if ![1, 2, 3, 4, 6, 8, 12, 24].contains(&h) {
                return Err(invalid(
                    "CreateRule.Interval must be 1, 2, 3, 4, 6, 8, 12 or 24",
                ));
            }
            let times = create["Times"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default();
            if times.len() > 1 {
                return Err(invalid("CreateRule.Times takes one time"));
            }
            let offset = match times.first() {
                Some(t) => Some(hhmm(t.as_str().unwrap_or(""))?),
                None => None,
            };
            (Some(h * 3600), offset, None)
        }
        (None, Some(c)) => (None, None, Some(c.to_owned())),
        _ => {
            return Err(invalid(
                "CreateRule needs exactly one of Interval and CronExpression",
            ));
        }
    };
    let retain = &s["RetainRule"];
    only(retain, "RetainRule", &["Count", "Interval", "IntervalUnit"])?;
    let mut keep = Retention::default();
    match (retain["Count"].as_u64(), retain["Interval"].as_u64()) {
        (Some(n), None) => {
            keep.keep_last =
                Some(u32::try_from(n).map_err(|_| invalid("RetainRule.Count is too large"))?);
        }
        (None, Some(n)) => {
            let unit = match retain["IntervalUnit"].as_str() {
                Some("DAYS") => 86400,
                Some("WEEKS") => 7 * 86400,
                Some("MONTHS") => 30 * 86400,
                Some("YEARS") => 365 * 86400,
                _ => {
                    return Err(invalid(
                        "RetainRule.IntervalUnit: DAYS, WEEKS, MONTHS or YEARS",
                    ));
                }
            };
            keep.keep_within = Some(n.saturating_mul(unit));
        }
        (None, None) if retain.is_null() => {}
        _ => {
            return Err(invalid(
                "RetainRule needs exactly one of Count and Interval",
            ));
        }
    }
    Ok(ScheduleSpec {
        name,
        every,
        offset,
        cron,
        retain: keep,
        tags: tags(&s["TagsToAdd"], "TagsToAdd")?,
        copy_tags: s["CopyTags"].as_bool().unwrap_or(false),
    })
}

/// The policy a DLM body describes.
fn spec(id: &str, b: &Value) -> DlmResult<PolicySpec> {
    let d = &b["PolicyDetails"];
    only(
        d,
        "PolicyDetails",
        &[
            "PolicyType",
            "ResourceTypes",
            "TargetTags",
            "Schedules",
            "ResourceLocations",
        ],
    )?;
    if d["PolicyType"]
        .as_str()
        .unwrap_or("EBS_SNAPSHOT_MANAGEMENT")
        != "EBS_SNAPSHOT_MANAGEMENT"
    {
        return Err(invalid(
            "only PolicyType EBS_SNAPSHOT_MANAGEMENT is supported",
        ));
    }
    for r in d["ResourceTypes"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        if !matches!(r.as_str(), Some("VOLUME" | "INSTANCE")) {
            return Err(invalid("ResourceTypes: VOLUME or INSTANCE"));
        }
    }
    let target_tags: Vec<TagMatch> = tags(&d["TargetTags"], "TargetTags")?
        .into_iter()
        .map(|(key, value)| TagMatch {
            key,
            value: Some(value),
        })
        .collect();
    if target_tags.is_empty() {
        return Err(invalid("PolicyDetails.TargetTags is required"));
    }
    let schedules = d["Schedules"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(schedule)
        .collect::<DlmResult<Vec<_>>>()?;
    Ok(PolicySpec {
        name: id.to_owned(),
        description: b["Description"].as_str().unwrap_or("").to_owned(),
        enabled: b["State"].as_str().unwrap_or("ENABLED") == "ENABLED",
        target: PolicyTarget {
            tags: target_tags,
            ..Default::default()
        },
        schedules,
    })
}

fn body(req: &Request) -> DlmResult<Value> {
    if req.body.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    serde_json::from_slice(&req.body).map_err(|e| invalid(format!("invalid request body: {e}")))
}

fn new_id() -> String {
    let s = snapshot::SnapshotId::generate();
    format!("policy-{}", &s.as_str()["snap-".len()..])
}

fn arn(state: &AwsState, id: &str) -> String {
    format!("arn:aws:dlm:{}:{OWNER_ID}:policy/{id}", state.region)
}

fn state_of(r: &PolicyRecord) -> &'static str {
    if r.spec.enabled {
        "ENABLED"
    } else {
        "DISABLED"
    }
}

fn iso(t: u64) -> String {
    crate::catalog::rfc3339(t)
}

/// Routes one authenticated request.
pub async fn handle(state: &AwsState, req: Request) -> Response {
    let rid = req.request_id.clone();
    match dispatch(state, &req).await {
        Ok((status, body)) => json_response(status, &body),
        Err(e) => {
            tracing::info!(request_id = rid, kind = e.kind, message = %e.message, "dlm request failed");
            super::ebs::error_response(&e, &rid)
        }
    }
}

async fn dispatch(state: &AwsState, req: &Request) -> DlmResult<(u16, Value)> {
    let lc = &state.lifecycle;
    let segs: Vec<&str> = req.path.trim_start_matches('/').split('/').collect();
    match (&req.method, segs.as_slice()) {
        (&Method::POST, ["policies"]) => {
            let b = body(req)?;
            only(
                &b,
                "CreateLifecyclePolicy",
                &[
                    "ExecutionRoleArn",
                    "Description",
                    "State",
                    "PolicyDetails",
                    "Tags",
                ],
            )?;
            let id = new_id();
            let spec = spec(&id, &b)?;
            lc.create_policy(spec, Source::Dlm, Some(b))
                .await
                .map_err(lc_err)?;
            Ok((200, json!({ "PolicyId": id })))
        }
        (&Method::GET, ["policies"]) => {
            let q: Vec<(String, String)> = form_urlencoded::parse(req.query.as_bytes())
                .into_owned()
                .collect();
            let ids: Vec<&str> = q
                .iter()
                .filter(|(k, _)| k == "policyIds")
                .map(|(_, v)| v.as_str())
                .collect();
            let st = q
                .iter()
                .find(|(k, _)| k == "state")
                .map(|(_, v)| v.as_str());
            let filter = ListFilter::parse(&q)?;
            let mut out = Vec::new();
            for r in lc.policy_records().map_err(lc_err)? {
                let Some(given) = &r.dlm else { continue };
                if !ids.is_empty() && !ids.contains(&r.spec.name.as_str()) {
                    continue;
                }
                if st.is_some_and(|s| s != state_of(&r)) {
                    continue;
                }
                if !filter.matches(given) {
                    continue;
                }
                out.push(json!({
                    "PolicyId": r.spec.name,
                    "Description": r.spec.description,
                    "State": state_of(&r),
                    "Tags": given.get("Tags").cloned().unwrap_or(json!({})),
                    "PolicyType": "EBS_SNAPSHOT_MANAGEMENT",
                    "DefaultPolicy": false,
                }));
            }
            Ok((200, json!({ "Policies": out })))
        }
        (&Method::GET, ["policies", id]) => {
            let r = lc.policy_record(id).map_err(lc_err)?;
            let Some(given) = &r.dlm else {
                return Err(not_found(id));
            };
            let p = lc.policy(id).map_err(lc_err)?;
            let status = if p.failing { "ERROR" } else { "" };
            Ok((
                200,
                json!({ "Policy": {
                    "PolicyId": r.spec.name,
                    "Description": r.spec.description,
                    "State": state_of(&r),
                    "StatusMessage": status,
                    "ExecutionRoleArn": given.get("ExecutionRoleArn").cloned().unwrap_or(Value::Null),
                    "DateCreated": iso(r.created_at),
                    "DateModified": iso(r.updated_at),
                    "PolicyDetails": given.get("PolicyDetails").cloned().unwrap_or(json!({})),
                    "Tags": given.get("Tags").cloned().unwrap_or(json!({})),
                    "PolicyArn": arn(state, &r.spec.name),
                    "DefaultPolicy": false,
                }}),
            ))
        }
        (&Method::PATCH, ["policies", id]) => {
            let b = body(req)?;
            only(
                &b,
                "UpdateLifecyclePolicy",
                &["ExecutionRoleArn", "Description", "State", "PolicyDetails"],
            )?;
            let old = lc.policy_record(id).map_err(lc_err)?;
            let Some(mut given) = old.dlm.clone() else {
                return Err(not_found(id));
            };
            for k in ["ExecutionRoleArn", "Description", "State", "PolicyDetails"] {
                if let Some(v) = b.get(k) {
                    given[k] = v.clone();
                }
            }
            let spec = spec(id, &given)?;
            lc.update_policy(spec, Some(given)).await.map_err(lc_err)?;
            Ok((200, json!({})))
        }
        (&Method::DELETE, ["policies", id]) => {
            let r = lc.policy_record(id).map_err(lc_err)?;
            if r.dlm.is_none() {
                return Err(not_found(id));
            }
            lc.delete_policy(id).await.map_err(lc_err)?;
            Ok((200, json!({})))
        }
        (m, _) => Err(invalid(format!("no DLM API at {m} {}", req.path))),
    }
}

/// GetLifecyclePolicies' filters beyond ids and state: `resourceTypes`
/// (the policy targets that type), `targetTags` and `tagsToAdd` (`key=value`,
/// the policy has any of them), and `defaultPolicyType` (no policy here is
/// a default policy, so it matches none).
#[derive(Debug, Default)]
struct ListFilter {
    resource_types: Vec<String>,
    target_tags: Vec<(String, String)>,
    tags_to_add: Vec<(String, String)>,
    default_only: bool,
}

impl ListFilter {
    fn parse(q: &[(String, String)]) -> DlmResult<ListFilter> {
        let all = |name: &str| -> Vec<&str> {
            q.iter()
                .filter(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
                .collect()
        };
        let tags = |name: &str| -> DlmResult<Vec<(String, String)>> {
            all(name)
                .into_iter()
                .map(|t| {
                    t.split_once('=')
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .ok_or_else(|| invalid(format!("{name} {t:?}: expected key=value")))
                })
                .collect()
        };
        let resource_types: Vec<String> = all("resourceTypes")
            .into_iter()
            .map(str::to_owned)
            .collect();
        for t in &resource_types {
            if !matches!(t.as_str(), "VOLUME" | "INSTANCE") {
                return Err(invalid(format!(
                    "resourceTypes {t:?}: expected VOLUME or INSTANCE"
                )));
            }
        }
        Ok(ListFilter {
            resource_types,
            target_tags: tags("targetTags")?,
            tags_to_add: tags("tagsToAdd")?,
            default_only: !all("defaultPolicyType").is_empty(),
        })
    }

    /// Whether a policy, as the DLM API was given it, passes.
    fn matches(&self, given: &Value) -> bool {
        if self.default_only {
            return false;
        }
        let details = &given["PolicyDetails"];
        let has = |list: &Value, want: &[(String, String)]| {
            want.is_empty()
                || list.as_array().is_some_and(|tags| {
                    tags.iter().any(|t| {
                        want.iter()
                            .any(|(k, v)| t["Key"] == k.as_str() && t["Value"] == v.as_str())
                    })
                })
        };
        let types_ok = self.resource_types.is_empty()
            || details["ResourceTypes"].as_array().is_some_and(|ts| {
                ts.iter()
                    .any(|t| self.resource_types.iter().any(|w| t == w.as_str()))
            });
        let added: Vec<Value> = details["Schedules"]
            .as_array()
            .map(|ss| {
                ss.iter()
                    .filter_map(|s| s["TagsToAdd"].as_array())
                    .flatten()
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        types_ok
            && has(&details["TargetTags"], &self.target_tags)
            && has(&Value::Array(added), &self.tags_to_add)
    }
}

#[cfg(test)]
mod list_filter_tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn filters_match_what_the_policy_was_given() {
        let given = json!({"PolicyDetails": {
            "ResourceTypes": ["VOLUME"],
            "TargetTags": [{"Key": "backup", "Value": "daily"}],
            "Schedules": [{"Name": "s", "TagsToAdd": [{"Key": "made-by", "Value": "dlm"}]}],
        }});
        let pass = |pairs: &[(&str, &str)]| ListFilter::parse(&q(pairs)).unwrap().matches(&given);
        assert!(pass(&[]));
        assert!(pass(&[("resourceTypes", "VOLUME")]));
        assert!(!pass(&[("resourceTypes", "INSTANCE")]));
        assert!(pass(&[("targetTags", "backup=daily")]));
        assert!(pass(&[
            ("targetTags", "x=y"),
            ("targetTags", "backup=daily")
        ]));
        assert!(!pass(&[("targetTags", "backup=weekly")]));
        assert!(pass(&[("tagsToAdd", "made-by=dlm")]));
        assert!(!pass(&[("tagsToAdd", "backup=daily")]));
        assert!(!pass(&[("defaultPolicyType", "ALL")]));
        assert!(ListFilter::parse(&q(&[("targetTags", "novalue")])).is_err());
        assert!(ListFilter::parse(&q(&[("resourceTypes", "BUCKET")])).is_err());
    }
}
