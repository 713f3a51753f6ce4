//! `vol key create | list | inspect | rotate | disable | enable | default`.

use hyper::Method;
use volumed_api::{CreateKey, EncryptionInfo, Key, KeyList, KeyRotation, SetDefaultKey};

use crate::args::KeyCommand;
use crate::client::Client;
use crate::output::Out;

/// A key reference (which may be `alias/aws/ebs` or an ARN) as one path
/// segment.
fn path(reference: &str) -> String {
    let mut out = String::from("/v1/keys/");
    for b in reference.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// How `inspect` shows a volume's or snapshot's encryption.
pub fn encryption_text(e: Option<&EncryptionInfo>) -> String {
    match e {
        None => "-".into(),
        Some(e) => format!(
            "key {} ({}), data key {}{}",
            e.key.as_deref().unwrap_or("unknown here"),
            e.key_id,
            e.data_key_id,
            e.problem
                .as_ref()
                .map_or_else(String::new, |p| format!(": {p}"))
        ),
    }
}

fn show(out: &Out, k: &Key) -> anyhow::Result<()> {
    if out.json {
        return Ok(out.json(k)?);
    }
    out.fields(&[
        ("name", k.name.clone()),
        ("id", k.id.clone()),
        ("arn", k.arn.clone()),
        ("aliases", k.aliases.join(", ")),
        (
            "state",
            match &k.reason {
                Some(r) => format!("{} ({r})", k.state),
                None => k.state.clone(),
            },
        ),
        ("version", k.version.to_string()),
        ("source", k.source.clone()),
        ("default", k.default.to_string()),
        ("created", k.created_at.clone()),
        (
            "description",
            if k.description.is_empty() {
                "-".into()
            } else {
                k.description.clone()
            },
        ),
    ])?;
    Ok(())
}

pub async fn run(client: &Client, out: &Out, cmd: KeyCommand) -> anyhow::Result<()> {
    match cmd {
        KeyCommand::Create {
            name,
            description,
            command,
        } => {
            let req = CreateKey {
                name,
                description,
                command,
            };
            let k: Key = client.send(Method::POST, "/v1/keys", &req).await?;
            show(out, &k)
        }
        KeyCommand::List => {
            let list: KeyList = client.get("/v1/keys").await?;
            if out.json {
                return Ok(out.json(&list)?);
            }
            let rows: Vec<Vec<String>> = list
                .keys
                .iter()
                .map(|k| {
                    vec![
                        k.name.clone(),
                        k.id.clone(),
                        k.state.clone(),
                        k.version.to_string(),
                        k.source.clone(),
                        if k.default { "*".into() } else { String::new() },
                        k.aliases.join(","),
                    ]
                })
                .collect();
            out.table(
                &[
                    "NAME", "ID", "STATE", "VERSION", "SOURCE", "DEFAULT", "ALIASES",
                ],
                &rows,
            )?;
            if !list.store_encrypted {
                out.line("(the store is not encrypted: no key is in use)")?;
            }
            Ok(())
        }
        KeyCommand::Inspect { key } => {
            let k: Key = client.get(&path(&key)).await?;
            show(out, &k)
        }
        KeyCommand::Rotate { key } => {
            let r: KeyRotation = client
                .send(
                    Method::POST,
                    &format!("{}/rotate", path(&key)),
                    &serde_json::json!({}),
                )
                .await?;
            if out.json {
                return Ok(out.json(&r)?);
            }
            out.line(format!(
                "key '{}' is at version {}: {} data keys in {} domains wrapped anew, {} new data keys for new data",
                r.key.name, r.key.version, r.rewrapped, r.domains, r.generations
            ))?;
            Ok(())
        }
        KeyCommand::Disable { key } => state(client, out, &key, "disable").await,
        KeyCommand::Enable { key } => state(client, out, &key, "enable").await,
        KeyCommand::Default { key } => {
            let k: Key = client
                .send(Method::POST, "/v1/default-key", &SetDefaultKey { key })
                .await?;
            show(out, &k)
        }
    }
}

async fn state(client: &Client, out: &Out, key: &str, verb: &str) -> anyhow::Result<()> {
    let k: Key = client
        .send(
            Method::POST,
            &format!("{}/{verb}", path(key)),
            &serde_json::json!({}),
        )
        .await?;
    if out.json {
        return Ok(out.json(&k)?);
    }
    out.line(format!("key '{}' is {}", k.name, k.state))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn references_become_one_path_segment() {
        assert_eq!(super::path("backup"), "/v1/keys/backup");
        assert_eq!(super::path("alias/aws/ebs"), "/v1/keys/alias%2Faws%2Febs");
        assert_eq!(
            super::path("arn:aws:kms:r:1:key/x"),
            "/v1/keys/arn%3Aaws%3Akms%3Ar%3A1%3Akey%2Fx"
        );
    }
}
