//! `vol bin list | restore | rule create | rule list | rule delete`.

use hyper::Method;
use volumed_api::{BinList, BinResource, BinRule, BinRuleList, BinRuleSpec, Image, Snapshot};

use crate::args::{BinCommand, BinRuleCommand};
use crate::client::Client;
use crate::output::Out;

fn rule_row(r: &BinRule) -> Vec<String> {
    let sel = if !r.spec.tags.is_empty() {
        r.spec
            .tags
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    } else if !r.spec.exclude_tags.is_empty() {
        let ex: Vec<String> = r
            .spec
            .exclude_tags
            .iter()
            .map(ToString::to_string)
            .collect();
        format!("all but {}", ex.join(", "))
    } else {
        "all".into()
    };
    vec![
        r.id.clone(),
        r.spec.resource.as_str().into(),
        humantime::format_duration(std::time::Duration::from_secs(r.spec.retention)).to_string(),
        sel,
        r.created_at.clone(),
    ]
}

pub async fn run(client: &Client, out: &Out, cmd: BinCommand) -> anyhow::Result<()> {
    match cmd {
        BinCommand::List => {
            let l: BinList = client.get("/v1/bin").await?;
            if out.json {
                return Ok(out.json(&l)?);
            }
            let rows: Vec<Vec<String>> = l
                .entries
                .iter()
                .map(|e| {
                    vec![
                        e.id.clone(),
                        e.resource.as_str().into(),
                        e.state.clone(),
                        e.name.clone().unwrap_or_else(|| e.volume.clone()),
                        e.entered_at.clone(),
                        e.expires_at.clone(),
                    ]
                })
                .collect();
            out.table(
                &[
                    "ID",
                    "RESOURCE",
                    "STATE",
                    "VOLUME/NAME",
                    "DELETED",
                    "EXPIRES",
                ],
                &rows,
            )?;
            Ok(())
        }
        BinCommand::Restore { id } if id.starts_with("ami-") => {
            let img: Image = client
                .send(
                    Method::POST,
                    &format!("/v1/bin/images/{}/restore", super::image::path_id(&id)?),
                    &(),
                )
                .await?;
            if out.json {
                return Ok(out.json(&img)?);
            }
            out.line(format!("restored image {} ({})", img.id, img.name))?;
            Ok(())
        }
        BinCommand::Restore { id } => {
            let s: Snapshot = client
                .send(Method::POST, &format!("/v1/bin/{id}/restore"), &())
                .await?;
            if out.json {
                return Ok(out.json(&s)?);
            }
            out.line(format!("restored snapshot {} ({})", s.id, s.state.as_str()))?;
            Ok(())
        }
        BinCommand::Rule(BinRuleCommand::Create {
            resource,
            retention,
            select,
            exclude,
            description,
        }) => {
            let spec = BinRuleSpec {
                resource: if resource == "image" {
                    BinResource::Image
                } else {
                    BinResource::Snapshot
                },
                retention: retention.as_secs(),
                tags: select,
                exclude_tags: exclude,
                description,
            };
            let r: BinRule = client.send(Method::POST, "/v1/bin/rules", &spec).await?;
            if out.json {
                return Ok(out.json(&r)?);
            }
            out.line(format!("created recycle-bin rule {}", r.id))?;
            Ok(())
        }
        BinCommand::Rule(BinRuleCommand::List) => {
            let l: BinRuleList = client.get("/v1/bin/rules").await?;
            if out.json {
                return Ok(out.json(&l)?);
            }
            let rows: Vec<Vec<String>> = l.rules.iter().map(rule_row).collect();
            out.table(&["ID", "RESOURCE", "RETENTION", "SELECT", "CREATED"], &rows)?;
            Ok(())
        }
        BinCommand::Rule(BinRuleCommand::Lock {
            id,
            unlock_delay_days,
        }) => {
            let path = format!("/v1/bin/rules/{}/lock", super::image::path_id(&id)?);
            let r: BinRule = client
                .send(
                    Method::POST,
                    &path,
                    &volumed_api::LockBinRule { unlock_delay_days },
                )
                .await?;
            if out.json {
                return Ok(out.json(&r)?);
            }
            out.line(format!("locked recycle-bin rule {}", r.id))?;
            Ok(())
        }
        BinCommand::Rule(BinRuleCommand::Unlock { id }) => {
            let path = format!("/v1/bin/rules/{}/unlock", super::image::path_id(&id)?);
            let r: BinRule = client.send(Method::POST, &path, &()).await?;
            if out.json {
                return Ok(out.json(&r)?);
            }
            let state = r.lock_state.as_deref().unwrap_or("unlocked");
            out.line(format!("unlocked recycle-bin rule {} ({state})", r.id))?;
            Ok(())
        }
        BinCommand::Rule(BinRuleCommand::Delete { id }) => {
            client.delete(&format!("/v1/bin/rules/{id}")).await?;
            if out.json {
                return Ok(out.json(&serde_json::json!({ "id": id, "deleted": true }))?);
            }
            out.line(format!("deleted recycle-bin rule {id}"))?;
            Ok(())
        }
    }
}
