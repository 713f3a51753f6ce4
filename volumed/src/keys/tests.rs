//! The key service on a real directory: names and references, the default
//! key, rotation, disabling, files from another host, refusals.

use std::os::unix::fs::PermissionsExt;

use super::*;
use snapshot::crypt::{KeyError, MasterKeys};

#[tokio::test]
async fn create_resolve_default_and_list() {
    let dir = tempfile::tempdir().unwrap();
    let keys = KeyService::open(dir.path(), "eu-west-1").await.unwrap();
    assert!(keys.list().is_empty());
    let k = keys.create("backup", "for backups", None).await.unwrap();
    assert_eq!(
        (k.name.as_str(), k.version, k.source),
        ("backup", 1, "local")
    );
    assert_eq!(
        k.arn,
        format!("arn:aws:kms:eu-west-1:000000000000:key/{}", k.id)
    );
    for r in [
        "backup".to_owned(),
        "alias/backup".to_owned(),
        k.id.clone(),
        k.arn.clone(),
        "arn:aws:kms:eu-west-1:000000000000:alias/backup".to_owned(),
    ] {
        assert_eq!(keys.resolve(&r).unwrap().id, k.id, "{r}");
    }
    assert!(matches!(
        keys.resolve("nope"),
        Err(KeyServiceError::NotFound(_))
    ));
    assert!(matches!(
        keys.create("backup", "", None).await,
        Err(KeyServiceError::Exists(_))
    ));
    assert!(matches!(
        keys.create("../x", "", None).await,
        Err(KeyServiceError::InvalidName { .. })
    ));
    // The default key is made on first need, under AWS's alias too.
    let d = keys.default_key().await.unwrap();
    assert_eq!(d.name, MANAGED_NAME);
    assert!(d.default && d.aliases.contains(&MANAGED_ALIAS.to_owned()));
    assert_eq!(keys.resolve(MANAGED_ALIAS).unwrap().id, d.id);
    assert_eq!(keys.set_default(Some("backup")).await.unwrap().id, k.id);
    assert_eq!(keys.default_key().await.unwrap().id, k.id);
    let names: Vec<_> = keys
        .list()
        .into_iter()
        .map(|k| (k.name, k.default))
        .collect();
    assert_eq!(names, [("aws-ebs".into(), false), ("backup".into(), true)]);
    // Everything survives a restart.
    drop(keys);
    let again = KeyService::open(dir.path(), "eu-west-1").await.unwrap();
    assert_eq!(again.default_key().await.unwrap().id, k.id);
    assert_eq!(again.material(&k.id, 1).unwrap(), {
        let l = again.read();
        l.keys[&k.id].material[&1].clone()
    });
}

#[tokio::test]
async fn rotation_keeps_old_versions_and_disabling_stops_every_use() {
    let dir = tempfile::tempdir().unwrap();
    let keys = KeyService::open(dir.path(), "us-east-1").await.unwrap();
    let k = keys.create("k", "", None).await.unwrap();
    let v1 = keys.material(&k.id, 1).unwrap();
    let r = keys.add_version("k").await.unwrap();
    assert_eq!(r.version, 2);
    assert_eq!(keys.material(&k.id, 1).unwrap(), v1, "old versions stay");
    let (v, m2) = keys.current(&k.id).unwrap();
    assert_eq!(v, 2);
    assert_ne!(m2, v1);
    keys.set_enabled("k", false).await.unwrap();
    let e = keys.check(&k.id).unwrap_err();
    assert_eq!(e.to_string(), format!("key 'k' ({}) is disabled", k.id));
    assert!(keys.material(&k.id, 1).is_err() && keys.current(&k.id).is_err());
    // Disabled stays disabled across a restart.
    let again = KeyService::open(dir.path(), "us-east-1").await.unwrap();
    assert!(again.check(&k.id).is_err());
    again.set_enabled(&k.id, true).await.unwrap();
    again.check(&k.id).unwrap();
    assert!(matches!(
        again.check("no-such-id"),
        Err(KeyError::Unknown(_))
    ));
}

#[tokio::test]
async fn a_key_file_copied_from_another_host_is_picked_up() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let ka = KeyService::open(a.path(), "us-east-1").await.unwrap();
    let kb = KeyService::open(b.path(), "us-east-1").await.unwrap();
    let k = ka.create("shared", "", None).await.unwrap();
    assert!(matches!(kb.check(&k.id), Err(KeyError::Unknown(_))));
    std::fs::copy(
        file::path_of(&a.path().join("keys"), "shared"),
        file::path_of(&b.path().join("keys"), "shared"),
    )
    .unwrap();
    assert_eq!(
        kb.material(&k.id, 1).unwrap(),
        ka.material(&k.id, 1).unwrap()
    );
    // A copy others can read is refused, at start.
    let path = file::path_of(&b.path().join("keys"), "shared");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = KeyService::open(b.path(), "us-east-1").await.unwrap_err();
    assert!(e.to_string().contains("chmod 600 it"), "{e}");
}

#[tokio::test]
async fn command_keys_take_material_from_their_command() {
    let dir = tempfile::tempdir().unwrap();
    let keys = KeyService::open(dir.path(), "us-east-1").await.unwrap();
    // Version v's material: v repeated, as an external KMS would keep it.
    let cmd = "printf '%064d' \"$VOLUMED_KEY_VERSION\"";
    let k = keys.create("kms", "", Some(cmd)).await.unwrap();
    assert_eq!(k.source, "command");
    assert_eq!(keys.material(&k.id, 1).unwrap().0[31], 1);
    keys.add_version("kms").await.unwrap();
    assert_eq!(keys.current(&k.id).unwrap().1.0[31], 2);
    // The file holds no material.
    let text = std::fs::read_to_string(file::path_of(&dir.path().join("keys"), "kms")).unwrap();
    assert!(!text.contains(&"0".repeat(60)), "{text}");
    // Reloaded at start, every version through the command.
    let again = KeyService::open(dir.path(), "us-east-1").await.unwrap();
    assert_eq!(again.material(&k.id, 1).unwrap().0[31], 1);
    assert_eq!(again.current(&k.id).unwrap().0, 2);
    // A command that fails leaves the key unavailable, said in one line.
    assert!(matches!(
        keys.create("bad", "", Some("exit 1")).await,
        Err(KeyServiceError::Command { .. })
    ));
}
