//! `segattn fetch` and `segattn list`: published checkpoints in the Hugging Face cache.

use anyhow::Result;
use clap::Args;
use serde_json::json;

use super::{EXIT_OK, EXIT_SOME_FAILED, batch};
use crate::hub::{self, Hub, KNOWN_MODELS};
use crate::model::{Vit, builtin};

#[derive(Debug, Args)]
#[command(after_help = "Environment, as for huggingface_hub:
  HF_HOME         cache root (default ~/.cache/huggingface); models go under $HF_HOME/hub
  HF_HUB_CACHE    the hub cache directory itself
  HF_ENDPOINT     the Hub's address (default https://huggingface.co)
  HF_TOKEN        access token for private or gated models (default: $HF_HOME/token)
  HF_HUB_OFFLINE  1: never use the network")]
pub struct FetchArgs {
    /// Model names (see `segattn list`) or Hub repositories as org/repo.
    #[arg(required = true, value_name = "NAME")]
    names: Vec<String>,
}

/// Fetches every name, reporting each failure and going on; prints each
/// snapshot directory on standard output.
pub fn fetch(args: FetchArgs) -> Result<u8> {
    for name in args.names.iter().filter(|name| *name != builtin::NAME) {
        hub::repo_id(name)?;
    }
    let hub = Hub::from_env();
    let mut failed = 0;
    for name in &args.names {
        if name == builtin::NAME {
            note!("{name}: built into segattn, nothing to fetch");
            continue;
        }
        match fetch_one(&hub, name) {
            Ok(snapshot) => outln!("{snapshot}")?,
            Err(err) => {
                failed += 1;
                note!("segattn: {name}: {}", batch::one_line(&err));
            }
        }
    }
    Ok(if failed == 0 { EXIT_OK } else { EXIT_SOME_FAILED })
}

fn fetch_one(hub: &Hub, name: &str) -> Result<String> {
    let fetched = hub.fetch(name, true)?;
    let model = &fetched.model;
    // A checkpoint that downloads fine but is not a ViT should fail here, not at first use.
    Vit::load(&model.snapshot)?;
    let what = if fetched.downloaded.is_empty() {
        "already in the cache".to_string()
    } else {
        format!("downloaded {}", fetched.downloaded.join(", "))
    };
    note!("{name}: {} ({}, {}): {what}", model.repo, model.weights_file, megabytes(model.bytes));
    Ok(model.snapshot.display().to_string())
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// The known names, whether each is cached, and any other cached checkpoints.
pub fn list(args: ListArgs) -> Result<u8> {
    let hub = Hub::from_env();
    let cached = hub.list()?;
    let known = KNOWN_MODELS.iter().map(|(name, repo)| (name.to_string(), repo.to_string()));
    let others = cached
        .iter()
        .filter(|m| !KNOWN_MODELS.iter().any(|(_, repo)| *repo == m.repo))
        .map(|m| (m.repo.clone(), m.repo.clone()));
    let builtin_row = json!({
        "name": builtin::NAME,
        "repo": null,
        "default": true,
        "cached": true,
        "builtin": true,
        "bytes": builtin::SAFETENSORS.len(),
        "snapshot": null,
    });
    let rows: Vec<serde_json::Value> = std::iter::once(builtin_row)
        .chain(known.chain(others).map(|(name, repo)| {
            let model = cached.iter().find(|m| m.repo == repo);
            json!({
                "name": name,
                "repo": repo,
                "default": false,
                "cached": model.is_some(),
                "builtin": false,
                "bytes": model.map(|m| m.bytes),
                "snapshot": model.map(|m| m.snapshot.display().to_string()),
            })
        }))
        .collect();
    if args.json {
        outln!(
            "{}",
            json!({ "cache_dir": hub.cache_dir.display().to_string(), "default": builtin::NAME, "models": rows })
        )?;
        return Ok(EXIT_OK);
    }
    outln!("{:<20} {:<40} CACHED", "NAME", "REPOSITORY")?;
    for row in &rows {
        let cached = row["bytes"].as_u64().map_or("-".to_string(), megabytes);
        let default = if row["default"] == true { "  (default)" } else { "" };
        outln!(
            "{:<20} {:<40} {cached}{default}",
            row["name"].as_str().unwrap_or(""),
            row["repo"].as_str().unwrap_or("(built in)")
        )?;
    }
    outln!("\ncache: {}", hub.cache_dir.display())?;
    outln!("default model (used when neither --weights nor --model is given): {}", builtin::NAME)?;
    Ok(EXIT_OK)
}

fn megabytes(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}
