//! Published checkpoints by name: fetching them from the Hugging Face Hub
//! into the shared Hugging Face cache, and finding them there without network.
//!
//! The cache layout is the Hub's own (`models--org--repo/{blobs,snapshots,refs}`),
//! so a checkpoint fetched here is one `transformers` finds too, and the other
//! way round. Environment variables mean what they mean to `huggingface_hub`:
//! `HF_HUB_CACHE`, `HF_HOME`, `HF_ENDPOINT`, `HF_TOKEN`, `HF_HUB_OFFLINE`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use hf_hub::api::Progress;
use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::{Cache, Repo};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Deserialize;

use crate::model::WEIGHT_FILES;

/// The failures whose remedy a caller words in its own terms (the command
/// line names `segattn fetch`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HubError {
    /// Not in the cache, and the network may not be used.
    NotCached { name: String, repo: String, cache_dir: PathBuf },
    /// A file's download failed part way; fetching the model again resumes it.
    DownloadFailed { name: String, repo: String, file: String, cause: String },
}

impl std::fmt::Display for HubError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HubError::NotCached { name, repo, cache_dir } => write!(
                f,
                "model `{name}` ({repo}) is not in the Hugging Face cache {} and the network is off",
                cache_dir.display()
            ),
            HubError::DownloadFailed { repo, file, cause, .. } => write!(f, "{repo}/{file}: download failed: {cause}"),
        }
    }
}

impl std::error::Error for HubError {}

/// Short names of the published DINO checkpoints and their Hub repositories.
pub const KNOWN_MODELS: [(&str, &str); 8] = [
    ("dino-vits8", "facebook/dino-vits8"),
    ("dino-vits16", "facebook/dino-vits16"),
    ("dino-vitb8", "facebook/dino-vitb8"),
    ("dino-vitb16", "facebook/dino-vitb16"),
    ("dinov2-small", "facebook/dinov2-small"),
    ("dinov2-base", "facebook/dinov2-base"),
    ("dinov2-small-reg", "facebook/dinov2-with-registers-small"),
    ("dinov2-base-reg", "facebook/dinov2-with-registers-base"),
];

const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
const CONFIG_FILE: &str = "config.json";
/// Attempts after the first when a download breaks off; each resumes where the last stopped.
const RETRIES: usize = 3;

/// The Hub repository a model name stands for: a short name from
/// [`KNOWN_MODELS`], or `org/repo` verbatim.
pub fn repo_id(name: &str) -> Result<String> {
    if let Some((_, repo)) = KNOWN_MODELS.iter().find(|(short, _)| *short == name) {
        return Ok(repo.to_string());
    }
    let valid = |part: &str| {
        !part.is_empty()
            && !part.starts_with('.')
            && part.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    match name.split_once('/') {
        Some((org, repo)) if valid(org) && valid(repo) => Ok(name.to_string()),
        _ => {
            let known: Vec<&str> = KNOWN_MODELS.iter().map(|(short, _)| *short).collect();
            bail!("unknown model `{name}`: use one of {} or a Hub repository as org/repo", known.join(", "))
        }
    }
}

/// Where and how to reach the Hub, and where its cache is.
#[derive(Debug, Clone)]
pub struct Hub {
    /// The `hub` directory holding `models--org--repo` folders.
    pub cache_dir: PathBuf,
    pub endpoint: String,
    pub token: Option<String>,
    /// No network at all: only what is cached can be used.
    pub offline: bool,
}

/// A model found in the cache.
#[derive(Debug, Clone)]
pub struct CachedModel {
    pub repo: String,
    /// The snapshot directory: what `--weights` would be given.
    pub snapshot: PathBuf,
    /// `model.safetensors` or `pytorch_model.bin`.
    pub weights_file: String,
    pub bytes: u64,
}

/// What [`Hub::fetch`] did.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub model: CachedModel,
    /// The files downloaded; empty when the cache was already up to date.
    pub downloaded: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct RepoInfo {
    sha: String,
    siblings: Vec<RepoFile>,
}

#[derive(Debug, Deserialize)]
struct RepoFile {
    rfilename: String,
    size: Option<u64>,
}

impl Hub {
    /// Settings from the environment, as `huggingface_hub` reads them.
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::home_dir().map(|h| h.join(".cache")))
                .unwrap_or_default()
                .join("huggingface")
        });
        let cache_dir = var("HF_HUB_CACHE").map(PathBuf::from).unwrap_or_else(|| home.join("hub"));
        let token = var("HF_TOKEN").or_else(|| {
            let stored = std::fs::read_to_string(home.join("token")).ok()?;
            Some(stored.trim().to_string()).filter(|t| !t.is_empty())
        });
        let endpoint = var("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let offline = var("HF_HUB_OFFLINE")
            .is_some_and(|v| ["1", "on", "yes", "true"].contains(&v.to_ascii_lowercase().as_str()));
        Self { cache_dir, endpoint: endpoint.trim_end_matches('/').to_string(), token, offline }
    }

    /// The cached checkpoint of `name` (see [`repo_id`]), if its current
    /// snapshot holds weights. Never touches the network.
    pub fn cached(&self, name: &str) -> Result<Option<CachedModel>> {
        Ok(self.cached_repo(&repo_id(name)?))
    }

    /// The snapshot directory of `name`: the cached one, else downloaded now
    /// (with a progress bar when `show_progress`), as `transformers` does on
    /// first use. Offline, a model not cached is an error that says how to get it.
    pub fn resolve(&self, name: &str, show_progress: bool) -> Result<PathBuf> {
        let repo = repo_id(name)?;
        if let Some(model) = self.cached_repo(&repo) {
            return Ok(model.snapshot);
        }
        if self.offline {
            let cache_dir = self.cache_dir.clone();
            return Err(HubError::NotCached { name: name.to_string(), repo, cache_dir }.into());
        }
        note!("segattn: downloading `{name}` ({repo}) into {}", self.cache_dir.display());
        Ok(self.fetch(name, show_progress)?.model.snapshot)
    }

    /// Every cached model repository whose current snapshot holds weights.
    pub fn list(&self) -> Result<Vec<CachedModel>> {
        let entries = match std::fs::read_dir(&self.cache_dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("{}: cannot read the cache", self.cache_dir.display())),
        };
        let mut models: Vec<CachedModel> = entries
            .filter_map(|entry| {
                let folder = entry.ok()?.file_name().into_string().ok()?;
                // `models--{org}--{repo}`: the Hub allows no `--` inside a name.
                let (org, repo) = folder.strip_prefix("models--")?.split_once("--")?;
                self.cached_repo(&format!("{org}/{repo}"))
            })
            .collect();
        models.sort_by(|a, b| a.repo.cmp(&b.repo));
        Ok(models)
    }

    fn cached_repo(&self, repo: &str) -> Option<CachedModel> {
        let cache = Cache::new(self.cache_dir.clone()).model(repo.to_string());
        WEIGHT_FILES.iter().find_map(|file| {
            let path = cache.get(file)?;
            let bytes = std::fs::metadata(&path).ok()?.len();
            Some(CachedModel {
                repo: repo.to_string(),
                snapshot: path.parent()?.to_path_buf(),
                weights_file: file.to_string(),
                bytes,
            })
        })
    }

    /// Downloads `name`'s weights and `config.json` into the cache, unless the
    /// cache already holds the repository's current revision. A broken-off
    /// download leaves only a `.part` file, which the next attempt resumes.
    pub fn fetch(&self, name: &str, show_progress: bool) -> Result<Fetched> {
        let repo = repo_id(name)?;
        if self.offline {
            return match self.cached_repo(&repo) {
                Some(model) => Ok(Fetched { model, downloaded: Vec::new() }),
                None => bail!(
                    "HF_HUB_OFFLINE is set and `{name}` ({repo}) is not in the Hugging Face cache {}: \
                     unset HF_HUB_OFFLINE to download it",
                    self.cache_dir.display()
                ),
            };
        }
        let api = ApiBuilder::from_cache(Cache::new(self.cache_dir.clone()))
            .with_endpoint(self.endpoint.clone())
            .with_token(self.token.clone())
            .with_progress(false)
            .with_retries(RETRIES)
            .build()
            .map_err(|e| anyhow!("cannot set up a connection to {}: {e}", self.endpoint))?
            .repo(Repo::model(repo.clone()));

        let info: RepoInfo = api
            .info_request()
            .query("blobs", "true")
            .call()
            .map_err(|e| self.request_error(&repo, e))?
            .into_json()
            .with_context(|| format!("{repo}: unexpected answer from {}", self.endpoint))?;
        let weights =
            WEIGHT_FILES.iter().find_map(|w| info.siblings.iter().find(|f| f.rfilename == *w)).ok_or_else(|| {
                let files: Vec<&str> = info.siblings.iter().map(|f| f.rfilename.as_str()).collect();
                anyhow!(
                    "{repo}: has no model.safetensors or pytorch_model.bin (it has: {})",
                    if files.is_empty() { "nothing".to_string() } else { files.join(", ") }
                )
            })?;
        let wanted: Vec<&RepoFile> =
            info.siblings.iter().filter(|f| f.rfilename == CONFIG_FILE).chain(std::iter::once(weights)).collect();

        let repo_dir = self.cache_dir.join(Repo::model(repo.clone()).folder_name());
        std::fs::create_dir_all(repo_dir.join("blobs"))
            .with_context(|| format!("cannot write to the Hugging Face cache {}", self.cache_dir.display()))?;

        let snapshot = repo_dir.join("snapshots").join(&info.sha);
        let mut downloaded = Vec::new();
        for file in wanted {
            let cached = snapshot.join(&file.rfilename);
            if file.size.is_some_and(|size| std::fs::metadata(&cached).is_ok_and(|m| m.len() == size)) {
                continue;
            }
            let path = api
                .download_with_progress(&file.rfilename, DownloadBar::new(show_progress))
                .map_err(|e| self.download_error(&repo, &file.rfilename, name, e))?;
            check_size(&path, file.size).with_context(|| format!("{repo}/{}", file.rfilename))?;
            downloaded.push(file.rfilename.clone());
        }
        let model = self
            .cached_repo(&repo)
            .ok_or_else(|| anyhow!("{repo}: downloaded, but {} has no weights", snapshot.display()))?;
        Ok(Fetched { model, downloaded })
    }

    fn request_error(&self, repo: &str, error: ureq::Error) -> anyhow::Error {
        match error {
            // The Hub answers 401 for repositories that do not exist as well as for private ones.
            ureq::Error::Status(401 | 404, _) => anyhow!(
                "{repo}: no such model on {} (private or gated models need a token: set HF_TOKEN)",
                self.endpoint
            ),
            ureq::Error::Status(403, _) => {
                anyhow!("{repo}: access refused by {} (gated model: accept its terms on the Hub)", self.endpoint)
            }
            ureq::Error::Status(code, _) => anyhow!("{repo}: {} answered HTTP {code}", self.endpoint),
            ureq::Error::Transport(t) => anyhow!("cannot reach {}: {t}", self.endpoint),
        }
    }

    fn download_error(&self, repo: &str, file: &str, name: &str, error: ApiError) -> anyhow::Error {
        let cause = match error {
            ApiError::RequestError(e) => self.request_error(repo, *e).to_string(),
            ApiError::TooManyRetries(e) => format!("gave up after {} attempts: {e}", RETRIES + 1),
            other => other.to_string(),
        };
        let (name, repo, file) = (name.to_string(), repo.to_string(), file.to_string());
        HubError::DownloadFailed { name, repo, file, cause }.into()
    }
}

/// A download that ended early or ran long must not stay in the cache as if whole.
fn check_size(path: &Path, expected: Option<u64>) -> Result<()> {
    let Some(expected) = expected else { return Ok(()) };
    let actual = std::fs::metadata(path)?.len();
    if actual != expected {
        let blob = std::fs::canonicalize(path)?;
        std::fs::remove_file(&blob)?;
        if path.symlink_metadata().is_ok() {
            std::fs::remove_file(path)?;
        }
        bail!("downloaded {actual} bytes, expected {expected}; removed it, fetch again");
    }
    Ok(())
}

/// A byte progress bar on standard error, drawn only on a terminal.
struct DownloadBar(ProgressBar);

impl DownloadBar {
    fn new(show: bool) -> Self {
        let bar = if show && std::io::stderr().is_terminal() {
            ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr())
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template("{msg:20} {bar:30} {bytes}/{total_bytes} {bytes_per_sec}, {eta} left")
                .expect("valid template"),
        );
        Self(bar)
    }
}

impl Progress for DownloadBar {
    fn init(&mut self, size: usize, filename: &str) {
        self.0.set_length(size as u64);
        self.0.set_position(0);
        self.0.set_message(filename.to_string());
    }

    fn update(&mut self, size: usize) {
        self.0.inc(size as u64);
    }

    fn finish(&mut self) {
        self.0.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_repositories() {
        assert_eq!(repo_id("dino-vits8").unwrap(), "facebook/dino-vits8");
        assert_eq!(repo_id("dinov2-base-reg").unwrap(), "facebook/dinov2-with-registers-base");
        assert_eq!(repo_id("facebook/dinov2-large").unwrap(), "facebook/dinov2-large");
        for bad in ["dino", "a/b/c", "/repo", "org/", "org/../x", "org/re po"] {
            let message = repo_id(bad).unwrap_err().to_string();
            assert!(message.starts_with(&format!("unknown model `{bad}`")), "{message}");
        }
    }

    #[test]
    fn cache_is_read_in_the_hub_layout() {
        let dir = tempfile::tempdir().unwrap();
        let hub = Hub { cache_dir: dir.path().to_path_buf(), endpoint: String::new(), token: None, offline: true };
        assert!(hub.list().unwrap().is_empty());
        let repo = dir.path().join("models--facebook--dino-vits16");
        let snapshot = repo.join("snapshots/abc");
        std::fs::create_dir_all(&snapshot).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc").unwrap();
        // A snapshot without weights (an interrupted fetch) is not a cached model.
        std::fs::write(snapshot.join("config.json"), "{}").unwrap();
        assert!(hub.cached("dino-vits16").unwrap().is_none());
        std::fs::write(snapshot.join("pytorch_model.bin"), [0u8; 10]).unwrap();
        let model = hub.cached("dino-vits16").unwrap().unwrap();
        assert_eq!(
            (model.snapshot, model.weights_file.as_str(), model.bytes),
            (snapshot.clone(), "pytorch_model.bin", 10)
        );
        std::fs::write(snapshot.join("model.safetensors"), [0u8; 20]).unwrap();
        let listed = hub.list().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(
            (listed[0].repo.as_str(), listed[0].weights_file.as_str()),
            ("facebook/dino-vits16", "model.safetensors")
        );
        assert_eq!(hub.resolve("dino-vits16", false).unwrap(), snapshot);
        let error = hub.resolve("dino-vitb8", false).unwrap_err();
        assert!(matches!(error.downcast_ref(), Some(HubError::NotCached { name, .. }) if name == "dino-vitb8"));
        assert!(error.to_string().contains("network is off"), "{error}");
    }
}
