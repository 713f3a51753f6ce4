//! `vol`: the command-line client of volumed.

mod args;
mod client;
mod commands;
mod output;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use volumed_api::{CreateVolume, ModifyVolume};

use args::{Cli, Command};
use client::Client;
use output::Out;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // One line, as every other error: clap's own first line already
            // names the argument and the reason.
            // When that line ends in a colon, what it announces is on the
            // next one ("required arguments were not provided:\n  --size").
            let text = e.to_string();
            let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
            let first = lines.next().unwrap_or("error: invalid arguments");
            match lines.next() {
                Some(next) if first.ends_with(':') => eprintln!("{first} {next}"),
                _ => eprintln!("{first}"),
            }
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The chain, each cause once.
            eprintln!("error: {}", volumed_api::error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let client = Client::new(socket_path(cli.socket)?);
    let out = Out { json: cli.json };
    use commands::{bin, job, key, policy, snapshot, status, volume};
    match cli.command {
        Command::Create {
            name,
            size,
            ephemeral,
            from_snapshot,
            chunk_size,
            no_hydrate,
            wait,
            tags,
            encrypted,
            key,
        } => {
            volume::create(
                &client,
                &out,
                CreateVolume {
                    name,
                    size,
                    ephemeral,
                    from_snapshot,
                    chunk_size,
                    hydrate: no_hydrate.then_some(false),
                    encrypted: encrypted.then_some(true),
                    key,
                },
                tags.into_iter().collect(),
                wait,
            )
            .await
        }
        Command::List { filters } => volume::list(&client, &out, &filters).await,
        Command::Tag { name, tags } => {
            volume::tag(&client, &out, name, tags.into_iter().collect()).await
        }
        Command::Untag { name, keys } => volume::untag(&client, &out, name, keys).await,
        Command::Inspect { name } => volume::inspect(&client, &out, name).await,
        Command::Attach { name, instance } => volume::attach(&client, &out, name, instance).await,
        Command::Detach { name } => volume::detach(&client, &out, name).await,
        Command::Modify {
            name,
            size,
            ephemeral,
        } => volume::modify(&client, &out, name, ModifyVolume { size, ephemeral }).await,
        Command::Delete { name } => volume::delete(&client, &out, name).await,
        Command::Status => status::status(&client, &out).await,
        Command::Gc { grace } => snapshot::gc(&client, &out, grace).await,
        Command::Snapshot(cmd) => snapshot::run(&client, &out, cmd).await,
        Command::Import {
            source,
            name,
            format,
            chunk_size,
            ephemeral,
            snapshot,
            labels,
            sha256,
            no_wait,
        } => {
            let req = volumed_api::ImportRequest {
                source,
                name,
                format,
                chunk_size,
                ephemeral,
                snapshot,
                labels: labels.into_iter().collect(),
                sha256,
            };
            commands::import::import(&client, &out, req, no_wait).await
        }
        Command::Job(cmd) => job::run(&client, &out, cmd).await,
        Command::Image(cmd) => commands::image::run(&client, &out, cmd).await,
        Command::Instance(cmd) => commands::instance::run(&client, &out, cmd).await,
        Command::Key(cmd) => key::run(&client, &out, cmd).await,
        Command::Policy(cmd) => policy::run(&client, &out, cmd).await,
        Command::Prune { policy, dry_run } => policy::prune(&client, &out, policy, dry_run).await,
        Command::Bin(cmd) => bin::run(&client, &out, cmd).await,
        Command::Export {
            source,
            dest,
            format,
            compress,
            keep_snapshot,
            no_wait,
        } => {
            let req = volumed_api::ExportRequest {
                source,
                destination: dest,
                format: Some(format),
                compress,
                keep_snapshot,
            };
            commands::export::export(&client, &out, req, no_wait).await
        }
    }
}

/// `--socket`/`VOLUMED_SOCKET`, else the socket in `VOLUMED_DATA_DIR`, else
/// the daemon's default data dir.
fn socket_path(flag: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = flag {
        return Ok(p);
    }
    if let Some(d) = std::env::var_os("VOLUMED_DATA_DIR").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d).join("volumed.sock"));
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|x| !x.is_empty()) {
        return Ok(PathBuf::from(x).join("volumed/volumed.sock"));
    }
    let home = std::env::var_os("HOME").filter(|h| !h.is_empty());
    let home = home.ok_or_else(|| anyhow::anyhow!("HOME is not set; pass --socket"))?;
    Ok(PathBuf::from(home).join(".local/share/volumed/volumed.sock"))
}
