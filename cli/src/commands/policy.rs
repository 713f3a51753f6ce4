//! `vol policy create | update | list | inspect | delete | run-now`, and
//! `vol prune`.

use hyper::Method;
use volumed_api::{
    Policy, PolicyList, PolicySpec, PolicyTarget, PruneReport, PruneRequest, Retention, RunResult,
    ScheduleSpec,
};

use crate::args::{PolicyArgs, PolicyCommand};
use crate::client::Client;
use crate::output::Out;

fn spec(a: PolicyArgs) -> PolicySpec {
    PolicySpec {
        name: a.name,
        description: a.description,
        enabled: !a.disabled,
        target: PolicyTarget {
            tags: a.select,
            volumes: a.volumes.iter().map(ToString::to_string).collect(),
            instance: a.instance,
        },
        schedules: vec![ScheduleSpec {
            name: "default".into(),
            every: a.every.map(|d| d.as_secs()),
            offset: None,
            cron: a.schedule,
            retain: Retention {
                keep_last: a.keep_last,
                keep_hourly: a.keep_hourly,
                keep_daily: a.keep_daily,
                keep_weekly: a.keep_weekly,
                keep_monthly: a.keep_monthly,
                keep_yearly: a.keep_yearly,
                keep_within: a.keep_within.map(|d| d.as_secs()),
            },
            tags: a.tags.into_iter().collect(),
            copy_tags: a.copy_tags,
        }],
    }
}

fn when(s: &ScheduleSpec) -> String {
    match (&s.cron, s.every) {
        (Some(c), _) => c.clone(),
        (None, Some(e)) => format!(
            "every {}",
            humantime::format_duration(std::time::Duration::from_secs(e))
        ),
        _ => "-".into(),
    }
}

fn keeps(r: &Retention) -> String {
    let mut parts = Vec::new();
    for (k, v) in [
        ("last", r.keep_last),
        ("hourly", r.keep_hourly),
        ("daily", r.keep_daily),
        ("weekly", r.keep_weekly),
        ("monthly", r.keep_monthly),
        ("yearly", r.keep_yearly),
    ] {
        if let Some(v) = v {
            parts.push(format!("{k}={v}"));
        }
    }
    if let Some(w) = r.keep_within {
        parts.push(format!(
            "within={}",
            humantime::format_duration(std::time::Duration::from_secs(w))
        ));
    }
    if parts.is_empty() {
        "all".into()
    } else {
        parts.join(" ")
    }
}

fn target(t: &PolicyTarget) -> String {
    if let Some(i) = &t.instance {
        return format!("instance {i}");
    }
    if !t.volumes.is_empty() {
        return format!("volumes {}", t.volumes.join(", "));
    }
    t.tags
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn last(r: Option<&RunResult>) -> String {
    match r {
        None => "-".into(),
        Some(r) if r.ok => format!(
            "ok at {} ({}, {} created, {} pruned, prune {})",
            r.finished_at,
            r.trigger.as_str(),
            r.created.len(),
            r.pruned.len(),
            r.prune
        ),
        Some(r) => format!(
            "FAILED at {} ({}): {}",
            r.finished_at,
            r.trigger.as_str(),
            r.error.as_deref().unwrap_or("")
        ),
    }
}

fn show(out: &Out, p: &Policy) -> anyhow::Result<()> {
    if out.json {
        return Ok(out.json(p)?);
    }
    let mut f = vec![
        ("name", p.spec.name.clone()),
        ("enabled", p.spec.enabled.to_string()),
        ("source", p.source.clone()),
        ("target", target(&p.spec.target)),
        ("volumes now", p.volumes_now.join(", ")),
    ];
    for (s, st) in p.spec.schedules.iter().zip(&p.status) {
        f.push(("schedule", format!("{}: {}", s.name, when(s))));
        f.push(("keep", keeps(&s.retain)));
        f.push((
            "next run",
            st.next_run.clone().unwrap_or_else(|| "-".into()),
        ));
        f.push(("last run", last(st.last_run.as_ref())));
        f.push((
            "runs",
            format!(
                "{} ({} failed), {} snapshots created, {} pruned",
                st.runs, st.failures, st.snapshots_created, st.snapshots_pruned
            ),
        ));
    }
    out.fields(&f)?;
    Ok(())
}

pub async fn run(client: &Client, out: &Out, cmd: PolicyCommand) -> anyhow::Result<()> {
    match cmd {
        PolicyCommand::Create(a) => {
            let p: Policy = client.send(Method::POST, "/v1/policies", &spec(a)).await?;
            show(out, &p)
        }
        PolicyCommand::Update(a) => {
            let s = spec(a);
            let p: Policy = client
                .send(Method::PUT, &format!("/v1/policies/{}", s.name), &s)
                .await?;
            show(out, &p)
        }
        PolicyCommand::List => {
            let l: PolicyList = client.get("/v1/policies").await?;
            if out.json {
                return Ok(out.json(&l)?);
            }
            let rows: Vec<Vec<String>> = l
                .policies
                .iter()
                .map(|p| {
                    let s = &p.spec.schedules[..];
                    vec![
                        p.spec.name.clone(),
                        p.spec.enabled.to_string(),
                        target(&p.spec.target),
                        s.iter().map(when).collect::<Vec<_>>().join("; "),
                        s.iter()
                            .map(|s| keeps(&s.retain))
                            .collect::<Vec<_>>()
                            .join("; "),
                        p.status
                            .iter()
                            .filter_map(|s| s.next_run.clone())
                            .min()
                            .unwrap_or_else(|| "-".into()),
                        if p.failing { "FAILING" } else { "ok" }.into(),
                    ]
                })
                .collect();
            out.table(
                &[
                    "NAME", "ENABLED", "TARGET", "SCHEDULE", "KEEP", "NEXT RUN", "LAST",
                ],
                &rows,
            )?;
            Ok(())
        }
        PolicyCommand::Inspect { name } => {
            let p: Policy = client.get(&format!("/v1/policies/{name}")).await?;
            show(out, &p)
        }
        PolicyCommand::Delete { name } => {
            client.delete(&format!("/v1/policies/{name}")).await?;
            if out.json {
                return Ok(out.json(&serde_json::json!({ "name": name, "deleted": true }))?);
            }
            out.line(format!("deleted policy {name}"))?;
            Ok(())
        }
        PolicyCommand::RunNow { name } => {
            let r: Vec<RunResult> = client
                .send(Method::POST, &format!("/v1/policies/{name}/run"), &())
                .await?;
            if out.json {
                return Ok(out.json(&r)?);
            }
            for r in &r {
                out.line(last(Some(r)))?;
            }
            if r.iter().any(|r| !r.ok) {
                anyhow::bail!("policy '{name}': the run failed");
            }
            Ok(())
        }
    }
}

/// `vol prune [--policy NAME] [--dry-run]`: one line per snapshot deleted
/// (or, dry, to be deleted).
pub async fn prune(
    client: &Client,
    out: &Out,
    policy: Option<String>,
    dry_run: bool,
) -> anyhow::Result<()> {
    let r: PruneReport = client
        .send(Method::POST, "/v1/prune", &PruneRequest { policy, dry_run })
        .await?;
    if out.json {
        return Ok(out.json(&r)?);
    }
    let verb = if dry_run { "would delete" } else { "deleted" };
    for s in &r.schedules {
        for id in &s.removed {
            out.line(format!(
                "{verb} {id} (policy {}, schedule {})",
                s.policy, s.schedule
            ))?;
        }
    }
    let failed: Vec<&String> = r.schedules.iter().flat_map(|s| &s.failed).collect();
    if let Some(first) = failed.first() {
        anyhow::bail!("{} deletions failed, first: {first}", failed.len());
    }
    Ok(())
}
