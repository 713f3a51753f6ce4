//! The Recycle Bin API: REST/JSON signed for `rbin`. Its rules are this
//! host's recycle-bin rules (`lifecycle::bin`), the same ones `vol bin
//! rule` shows.
//!
//! | method | path | action |
//! | --- | --- | --- |
//! | POST | /rules | CreateRule |
//! | POST | /list-rules | ListRules |
//! | GET | /rules/{id} | GetRule |
//! | PATCH | /rules/{id} | UpdateRule |
//! | DELETE | /rules/{id} | DeleteRule |
//! | PATCH | /rules/{id}/lock | LockRule |
//! | PATCH | /rules/{id}/unlock | UnlockRule |
//! | POST | /tags/{arn} | TagResource |
//! | DELETE | /tags/{arn}?tagKeys=K | UntagResource |
//! | GET | /tags/{arn} | ListTagsForResource |
//!
//! Retention is in days, as AWS takes it (1 to 365). A locked rule (or
//! one within its unlock delay) refuses what `lifecycle::bin` forbids with
//! a ConflictException.

use std::collections::BTreeMap;

use hyper::Method;
use serde::Deserialize;
use serde_json::{Value, json};
use volumed_api::{BinResource, BinRuleSpec, TagMatch};

use super::ebs::{EbsError, json_response};
use super::{AwsState, OWNER_ID, Request, Response, unix_now};
use crate::catalog::BinRuleRecord;
use crate::lifecycle::LifecycleError;
use crate::lifecycle::bin::{LockState, lock_state};

type RbinResult<T> = Result<T, EbsError>;

fn invalid(message: impl Into<String>) -> EbsError {
    EbsError {
        kind: "ValidationException",
        status: 400,
        reason: Some("INVALID_VALUE"),
        message: message.into(),
    }
}

fn not_found(id: &str) -> EbsError {
    EbsError {
        kind: "ResourceNotFoundException",
        status: 404,
        reason: Some("RULE_NOT_FOUND"),
        message: format!("Rule {id} does not exist."),
    }
}

fn conflict(message: String) -> EbsError {
    EbsError {
        kind: "ConflictException",
        status: 409,
        reason: Some("INVALID_RULE_STATE"),
        message,
    }
}

impl From<LifecycleError> for EbsError {
    fn from(e: LifecycleError) -> Self {
        match e {
            LifecycleError::RuleNotFound(id) => not_found(&id),
            LifecycleError::RuleLocked(m) => conflict(m),
            LifecycleError::Engine(e) => e.into(),
            LifecycleError::Catalog(e) => e.into(),
            e => invalid(volumed_api::error_chain(&e)),
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct Retention {
    retention_period_value: u64,
    retention_period_unit: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct ResourceTag {
    resource_tag_key: String,
    #[serde(default)]
    resource_tag_value: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct Tag {
    key: String,
    value: String,
}

/// CreateRule's and UpdateRule's body.
#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct RuleBody {
    retention_period: Option<Retention>,
    description: Option<String>,
    tags: Option<Vec<Tag>>,
    resource_type: Option<String>,
    resource_tags: Option<Vec<ResourceTag>>,
    exclude_resource_tags: Option<Vec<ResourceTag>>,
    lock_configuration: Option<LockConfiguration>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct LockConfiguration {
    unlock_delay: UnlockDelay,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct UnlockDelay {
    unlock_delay_value: u64,
    unlock_delay_unit: String,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct LockBody {
    lock_configuration: Option<LockConfiguration>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct TagBody {
    tags: Option<Vec<Tag>>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct ListBody {
    max_results: Option<u64>,
    next_token: Option<String>,
    resource_type: Option<String>,
    resource_tags: Option<Vec<ResourceTag>>,
    exclude_resource_tags: Option<Vec<ResourceTag>>,
    lock_state: Option<String>,
}

fn body<T: for<'a> Deserialize<'a> + Default>(req: &Request) -> RbinResult<T> {
    if req.body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(&req.body).map_err(|e| invalid(format!("invalid request body: {e}")))
}

fn resource(s: &str) -> RbinResult<BinResource> {
    match s {
        "EBS_SNAPSHOT" => Ok(BinResource::Snapshot),
        "EC2_IMAGE" => Ok(BinResource::Image),
        other => Err(invalid(format!(
            "ResourceType {other:?}: expected EBS_SNAPSHOT or EC2_IMAGE"
        ))),
    }
}

fn resource_name(r: BinResource) -> &'static str {
    match r {
        BinResource::Snapshot => "EBS_SNAPSHOT",
        BinResource::Image => "EC2_IMAGE",
    }
}

fn retention(r: &Retention) -> RbinResult<u64> {
    if r.retention_period_unit != "DAYS" {
        return Err(invalid("RetentionPeriodUnit must be DAYS"));
    }
    if !(1..=365).contains(&r.retention_period_value) {
        return Err(invalid("RetentionPeriodValue must be from 1 to 365"));
    }
    Ok(r.retention_period_value * 86400)
}

fn matches(tags: &[ResourceTag]) -> Vec<TagMatch> {
    tags.iter()
        .map(|t| TagMatch {
            key: t.resource_tag_key.clone(),
            value: t.resource_tag_value.clone(),
        })
        .collect()
}

fn tags_json(ms: &[TagMatch]) -> Value {
    ms.iter()
        .map(|m| match &m.value {
            Some(v) => json!({ "ResourceTagKey": m.key, "ResourceTagValue": v }),
            None => json!({ "ResourceTagKey": m.key }),
        })
        .collect()
}

fn arn(state: &AwsState, id: &str) -> String {
    format!("arn:aws:rbin:{}:{OWNER_ID}:rule/{id}", state.region)
}

fn now() -> u64 {
    u64::try_from(unix_now()).unwrap_or(0)
}

fn unlock_days(c: &LockConfiguration) -> RbinResult<u64> {
    if c.unlock_delay.unlock_delay_unit != "DAYS" {
        return Err(invalid("UnlockDelayUnit must be DAYS"));
    }
    Ok(c.unlock_delay.unlock_delay_value)
}

fn rule_json(state: &AwsState, r: &BinRuleRecord) -> Value {
    let days = r.spec.retention.div_ceil(86400).max(1);
    let lock = lock_state(r, now());
    let mut out = json!({
        "Identifier": r.id,
        "RetentionPeriod": { "RetentionPeriodValue": days, "RetentionPeriodUnit": "DAYS" },
        "Description": r.spec.description,
        "Tags": r.rule_tags.iter().map(|(k, v)| json!({ "Key": k, "Value": v })).collect::<Vec<_>>(),
        "ResourceType": resource_name(r.spec.resource),
        "ResourceTags": tags_json(&r.spec.tags),
        "ExcludeResourceTags": tags_json(&r.spec.exclude_tags),
        "Status": "available",
        "LockState": lock.as_str(),
        "RuleArn": arn(state, &r.id),
    });
    if let Some(l) = &r.lock {
        out["LockConfiguration"] = json!({
            "UnlockDelay": {
                "UnlockDelayValue": l.unlock_delay / 86400,
                "UnlockDelayUnit": "DAYS",
            }
        });
    }
    if let LockState::PendingUnlock(t) = lock {
        // A timestamp in the REST-JSON protocol: epoch seconds.
        out["LockEndTime"] = json!(t);
    }
    out
}

/// The rule an rbin ARN names (`arn:aws:rbin:REGION:ACCOUNT:rule/ID`),
/// the path segment percent-decoded.
fn rule_of_arn(seg: &str) -> RbinResult<String> {
    let arn = super::sigv4::percent_decode(seg)
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| invalid(format!("bad escape in resource ARN {seg:?}")))?;
    let id = arn
        .strip_prefix("arn:")
        .filter(|_| arn.split(':').nth(2) == Some("rbin"))
        .and_then(|_| arn.rsplit_once(":rule/"))
        .map(|(_, id)| id.to_owned())
        .ok_or_else(|| invalid(format!("ResourceArn {arn:?} is not a Recycle Bin rule ARN")))?;
    Ok(id)
}

fn tags_list(tags: &BTreeMap<String, String>) -> Value {
    tags.iter()
        .map(|(k, v)| json!({ "Key": k, "Value": v }))
        .collect()
}

/// Routes one authenticated request.
pub async fn handle(state: &AwsState, req: Request) -> Response {
    let rid = req.request_id.clone();
    let (status, body) = match dispatch(state, &req).await {
        Ok(r) => r,
        Err(e) => {
            tracing::info!(request_id = rid, kind = e.kind, message = %e.message, "rbin request failed");
            return super::ebs::error_response(&e, &rid);
        }
    };
    json_response(status, &body)
}

async fn dispatch(state: &AwsState, req: &Request) -> RbinResult<(u16, Value)> {
    let lc = &state.lifecycle;
    let segs: Vec<&str> = req.path.trim_start_matches('/').split('/').collect();
    match (&req.method, segs.as_slice()) {
        (&Method::POST, ["rules"]) => {
            let b: RuleBody = body(req)?;
            let lock_days = b.lock_configuration.as_ref().map(unlock_days).transpose()?;
            let spec = BinRuleSpec {
                resource: resource(b.resource_type.as_deref().unwrap_or(""))?,
                retention: retention(
                    b.retention_period
                        .as_ref()
                        .ok_or_else(|| invalid("RetentionPeriod is required"))?,
                )?,
                tags: matches(b.resource_tags.as_deref().unwrap_or_default()),
                exclude_tags: matches(b.exclude_resource_tags.as_deref().unwrap_or_default()),
                description: b.description.unwrap_or_default(),
            };
            let rule_tags: BTreeMap<String, String> = b
                .tags
                .unwrap_or_default()
                .into_iter()
                .map(|t| (t.key, t.value))
                .collect();
            let r = lc.create_bin_rule(spec, rule_tags, lock_days).await?;
            Ok((201, rule_json(state, &lc.bin_rule(&r.id)?)))
        }
        (&Method::POST, ["list-rules"]) => {
            let b: ListBody = body(req)?;
            let kind = resource(b.resource_type.as_deref().unwrap_or(""))?;
            if b.max_results.is_some_and(|m| !(1..=1000).contains(&m)) {
                return Err(invalid("MaxResults must be from 1 to 1000"));
            }
            let now = now();
            let want = matches(b.resource_tags.as_deref().unwrap_or_default());
            let excl = matches(b.exclude_resource_tags.as_deref().unwrap_or_default());
            let mut rules: Vec<BinRuleRecord> = lc
                .bin_rule_records()?
                .into_iter()
                .filter(|r| r.spec.resource == kind)
                .filter(|r| want.iter().all(|m| r.spec.tags.contains(m)))
                .filter(|r| excl.iter().all(|m| r.spec.exclude_tags.contains(m)))
                .filter(|r| {
                    b.lock_state
                        .as_deref()
                        .is_none_or(|s| s == lock_state(r, now).as_str())
                })
                .collect();
            rules.sort_by(|a, b| a.id.cmp(&b.id));
            if let Some(t) = &b.next_token {
                rules.retain(|r| r.id.as_str() > t.as_str());
            }
            let max = usize::try_from(b.max_results.unwrap_or(1000)).unwrap_or(1000);
            let next = (rules.len() > max).then(|| rules[max - 1].id.clone());
            rules.truncate(max);
            let list: Vec<Value> = rules
                .iter()
                .map(|r| {
                    let full = rule_json(state, r);
                    json!({
                        "Identifier": full["Identifier"],
                        "Description": full["Description"],
                        "RetentionPeriod": full["RetentionPeriod"],
                        "LockState": full["LockState"],
                        "RuleArn": full["RuleArn"],
                    })
                })
                .collect();
            let mut out = json!({ "Rules": list });
            if let Some(n) = next {
                out["NextToken"] = n.into();
            }
            Ok((200, out))
        }
        (&Method::GET, ["rules", id]) => Ok((200, rule_json(state, &lc.bin_rule(id)?))),
        (&Method::PATCH, ["rules", id]) => {
            let b: RuleBody = body(req)?;
            if b.lock_configuration.is_some() {
                return Err(invalid(
                    "UpdateRule does not take LockConfiguration; use LockRule",
                ));
            }
            if b.tags.is_some() {
                return Err(invalid("UpdateRule does not take Tags; use TagResource"));
            }
            let old = lc.bin_rule(id)?;
            if let Some(t) = &b.resource_type
                && resource(t)? != old.spec.resource
            {
                return Err(invalid("a rule's ResourceType cannot change"));
            }
            let retention = b.retention_period.as_ref().map(retention).transpose()?;
            let r = lc
                .update_bin_rule(id, |r| {
                    if let Some(s) = retention {
                        r.spec.retention = s;
                    }
                    if let Some(d) = b.description {
                        r.spec.description = d;
                    }
                    if let Some(t) = &b.resource_tags {
                        r.spec.tags = matches(t);
                    }
                    if let Some(t) = &b.exclude_resource_tags {
                        r.spec.exclude_tags = matches(t);
                    }
                })
                .await?;
            Ok((200, rule_json(state, &r)))
        }
        (&Method::PATCH, ["rules", id, "lock"]) => {
            let b: LockBody = body(req)?;
            let c = b
                .lock_configuration
                .as_ref()
                .ok_or_else(|| invalid("LockConfiguration is required"))?;
            let r = lc.lock_bin_rule(id, unlock_days(c)?).await?;
            Ok((200, rule_json(state, &r)))
        }
        (&Method::PATCH, ["rules", id, "unlock"]) => {
            let r = lc.unlock_bin_rule(id).await?;
            Ok((200, rule_json(state, &r)))
        }
        (&Method::GET, ["tags", arn]) => {
            let r = lc.bin_rule(&rule_of_arn(arn)?)?;
            Ok((200, json!({ "Tags": tags_list(&r.rule_tags) })))
        }
        (&Method::POST, ["tags", arn]) => {
            let id = rule_of_arn(arn)?;
            let b: TagBody = body(req)?;
            let set: Vec<Tag> = b.tags.ok_or_else(|| invalid("Tags is required"))?;
            lc.update_bin_rule(&id, |r| {
                r.rule_tags
                    .extend(set.into_iter().map(|t| (t.key, t.value)));
            })
            .await?;
            Ok((201, json!({})))
        }
        (&Method::DELETE, ["tags", arn]) => {
            let id = rule_of_arn(arn)?;
            let keys: Vec<String> = super::sigv4::parse_query(&req.query)
                .map_err(|e| invalid(e.to_string()))?
                .into_iter()
                .filter(|(k, _)| k == "tagKeys")
                .map(|(_, v)| v)
                .collect();
            if keys.is_empty() {
                return Err(invalid("tagKeys is required"));
            }
            lc.update_bin_rule(&id, |r| {
                for k in &keys {
                    r.rule_tags.remove(k);
                }
            })
            .await?;
            Ok((204, json!({})))
        }
        (&Method::DELETE, ["rules", id]) => {
            lc.delete_bin_rule(id).await?;
            Ok((200, json!({})))
        }
        (m, _) => Err(invalid(format!("no Recycle Bin API at {m} {}", req.path))),
    }
}
