//! `segattn fetch`, `list` and `--model` against a Hugging Face Hub stand-in
//! on 127.0.0.1 that serves the fixture models in the Hub's URL layout.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

mod common;
use common::{fixture, s, sample, stderr};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Repositories by id, each a list of (file name, contents).
type Repos = HashMap<String, Vec<(String, Vec<u8>)>>;

/// A minimal Hub: `GET /api/models/{repo}/revision/main` and
/// `GET /{repo}/resolve/main/{file}` with byte ranges; 404 for the rest.
struct Hub {
    endpoint: String,
    /// `GET path [range]` per request, in order.
    log: Arc<Mutex<Vec<String>>>,
    /// While above zero, each file download is cut off after `CUT_AFTER` bytes.
    drops_left: Arc<AtomicUsize>,
}

const CUT_AFTER: usize = 4096;

impl Hub {
    fn start(repos: Repos) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let log = Arc::new(Mutex::new(Vec::new()));
        let drops_left = Arc::new(AtomicUsize::new(0));
        let repos = Arc::new(repos);
        let (thread_log, thread_drops) = (log.clone(), drops_left.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (repos, log, drops) = (repos.clone(), thread_log.clone(), thread_drops.clone());
                std::thread::spawn(move || serve(stream, &repos, &log, &drops));
            }
        });
        Self { endpoint, log, drops_left }
    }

    fn requests(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

fn serve(mut stream: TcpStream, repos: &Repos, log: &Mutex<Vec<String>>, drops_left: &AtomicUsize) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    reader.read_line(&mut request_line).unwrap();
    let mut headers = HashMap::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let Some((key, value)) = line.trim_end().split_once(": ") else { break };
        headers.insert(key.to_ascii_lowercase(), value.to_string());
    }
    let target = request_line.split_whitespace().nth(1).unwrap_or("").to_string();
    let path = target.split('?').next().unwrap().to_string();
    let range = headers.get("range").cloned();
    let auth = headers.get("authorization").map(|a| format!(" auth={a}")).unwrap_or_default();
    log.lock().unwrap().push(format!("GET {path} {}{auth}", range.as_deref().unwrap_or("")).trim_end().to_string());

    let found = repos.iter().find_map(|(id, files)| {
        if path == format!("/api/models/{id}/revision/main") {
            let siblings: Vec<String> = files
                .iter()
                .map(|(name, bytes)| format!(r#"{{"rfilename":"{name}","size":{}}}"#, bytes.len()))
                .collect();
            let body = format!(r#"{{"id":"{id}","sha":"{COMMIT}","siblings":[{}]}}"#, siblings.join(","));
            return Some(Response::Json(body));
        }
        let file = path.strip_prefix(&format!("/{id}/resolve/main/"))?;
        files.iter().find(|(name, _)| name == file).map(|(_, bytes)| Response::File(bytes))
    });
    let _ = match found {
        None => write!(stream, "HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot found"),
        Some(Response::Json(body)) => write!(
            stream,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
        Some(Response::File(bytes)) => send_file(&mut stream, bytes, range.as_deref(), drops_left),
    };
}

enum Response<'a> {
    Json(String),
    File(&'a [u8]),
}

fn send_file(
    stream: &mut TcpStream,
    bytes: &[u8],
    range: Option<&str>,
    drops_left: &AtomicUsize,
) -> std::io::Result<()> {
    let (start, end) = match range.and_then(|r| r.strip_prefix("bytes=")).and_then(|r| r.split_once('-')) {
        Some((a, b)) => (a.parse().unwrap(), if b.is_empty() { bytes.len() - 1 } else { b.parse().unwrap() }),
        None => (0, bytes.len() - 1),
    };
    let body = &bytes[start..=end];
    let status = if range.is_some() { "206 Partial Content" } else { "200 OK" };
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{end}/{}\r\nETag: \"{:016x}\"\r\n\
         X-Repo-Commit: {COMMIT}\r\nConnection: close\r\n\r\n",
        body.len(),
        bytes.len(),
        fnv(bytes),
    )?;
    // The one-byte probe for the file's size is never cut off; downloads are.
    let is_download = body.len() > 1;
    if is_download && drops_left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
        stream.write_all(&body[..CUT_AFTER.min(body.len())])?;
        return stream.shutdown(std::net::Shutdown::Both);
    }
    stream.write_all(body)
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100000001b3))
}

fn repo_files(dir: &str) -> Vec<(String, Vec<u8>)> {
    std::fs::read_dir(fixture(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !p.ends_with("reference.safetensors"))
        .map(|p| (p.file_name().unwrap().to_str().unwrap().to_string(), std::fs::read(&p).unwrap()))
        .collect()
}

fn standard_hub() -> Hub {
    Hub::start(HashMap::from([
        ("facebook/dino-vits8".to_string(), repo_files("dino_vit")),
        ("someone/vit-pickle".to_string(), repo_files("dino_vit_pickle")),
    ]))
}

/// segattn with a private Hugging Face home and nothing inherited that would change where it looks.
fn segattn(home: &Path, endpoint: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_segattn"));
    cmd.args(args).env("HF_HOME", home).env("HF_ENDPOINT", endpoint);
    for var in [
        "SEGATTN_WEIGHTS",
        "SEGATTN_MODEL",
        "HF_HUB_CACHE",
        "HF_TOKEN",
        "HF_HUB_OFFLINE",
        "ALL_PROXY",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "all_proxy",
        "http_proxy",
        "https_proxy",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

fn output(cmd: &mut Command) -> Output {
    cmd.output().unwrap()
}

/// An endpoint nothing listens on: any attempt to use the network fails.
const NO_NETWORK: &str = "http://127.0.0.1:9";

fn snapshot(home: &Path, repo: &str) -> PathBuf {
    home.join("hub").join(format!("models--{}", repo.replace('/', "--"))).join("snapshots").join(COMMIT)
}

#[test]
fn fetch_then_run_offline_from_the_cache() {
    let hub = standard_hub();
    let home = tempfile::tempdir().unwrap();
    let fetched = output(segattn(home.path(), &hub.endpoint, &["fetch", "dino-vits8"]).env("HF_TOKEN", "hf_test"));
    assert_eq!(fetched.status.code(), Some(0), "{}", stderr(&fetched));
    let expected = snapshot(home.path(), "facebook/dino-vits8");
    assert_eq!(String::from_utf8_lossy(&fetched.stdout).trim(), s(&expected));
    for file in ["model.safetensors", "config.json"] {
        assert_eq!(std::fs::read(expected.join(file)).unwrap(), std::fs::read(fixture("dino_vit").join(file)).unwrap());
        assert!(expected.join(file).symlink_metadata().unwrap().is_symlink(), "snapshots link into blobs/");
    }
    let refs = home.path().join("hub/models--facebook--dino-vits8/refs/main");
    assert_eq!(std::fs::read_to_string(refs).unwrap(), COMMIT);
    assert!(hub.requests().iter().all(|r| r.ends_with("auth=Bearer hf_test")), "{:?}", hub.requests());

    // Offline, with no network at all, by name.
    let dir = tempfile::tempdir().unwrap();
    let cat = sample("cat.jpg");
    let by_name = dir.path().join("by_name.png");
    let by_path = dir.path().join("by_path.png");
    let args = ["run", s(&cat), "--out", s(&by_name), "--size", "64", "--model", "dino-vits8"];
    let result = output(segattn(home.path(), NO_NETWORK, &args).env("HF_HUB_OFFLINE", "1"));
    assert_eq!(result.status.code(), Some(0), "{}", stderr(&result));
    let weights = fixture("dino_vit");
    let args = ["run", s(&cat), "--out", s(&by_path), "--size", "64", "--weights", s(&weights)];
    assert_eq!(output(&mut segattn(home.path(), NO_NETWORK, &args)).status.code(), Some(0));
    let reference = std::fs::read(&by_path).unwrap();
    assert_eq!(std::fs::read(&by_name).unwrap(), reference);

    // A second fetch finds the cache current and downloads nothing.
    let before = hub.requests().len();
    let again = output(&mut segattn(home.path(), &hub.endpoint, &["fetch", "dino-vits8"]));
    assert_eq!(again.status.code(), Some(0));
    assert!(stderr(&again).contains("already in the cache"), "{}", stderr(&again));
    assert!(hub.requests()[before..].iter().all(|r| r.contains("/api/models/")), "{:?}", hub.requests());

    let list = output(&mut segattn(home.path(), NO_NETWORK, &["list", "--json"]));
    let list: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let models = list["models"].as_array().unwrap();
    let row = |name: &str| models.iter().find(|m| m["name"] == name).unwrap();
    assert_eq!(row("dino-vits8")["cached"], true);
    assert_eq!(row("dino-vits8")["default"], false);
    assert_eq!(row("segattn-s16")["default"], true);
    assert_eq!(row("dino-vits8")["snapshot"], s(&expected));
    assert_eq!(row("dinov2-small-reg")["repo"], "facebook/dinov2-with-registers-small");
    assert_eq!(row("dinov2-small-reg")["cached"], false);
}

#[test]
fn first_use_of_a_named_model_downloads_it() {
    let hub = standard_hub();
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cat = sample("cat.jpg");
    let (first, second, by_path) =
        (dir.path().join("first.png"), dir.path().join("second.png"), dir.path().join("by_path.png"));
    let args = ["run", s(&cat), "--out", s(&first), "--size", "64", "--model", "dino-vits8"];
    let result = output(&mut segattn(home.path(), &hub.endpoint, &args));
    assert_eq!(result.status.code(), Some(0), "{}", stderr(&result));
    assert!(stderr(&result).contains("downloading `dino-vits8` (facebook/dino-vits8)"), "{}", stderr(&result));
    assert!(snapshot(home.path(), "facebook/dino-vits8").join("model.safetensors").is_file());
    assert!(hub.requests().iter().any(|r| r.contains("/resolve/main/model.safetensors")), "{:?}", hub.requests());

    // The second use reads the cache, with no network to reach.
    let args = ["run", s(&cat), "--out", s(&second), "--size", "64", "--model", "dino-vits8"];
    let result = output(&mut segattn(home.path(), NO_NETWORK, &args));
    assert_eq!(result.status.code(), Some(0), "{}", stderr(&result));
    assert!(!stderr(&result).contains("downloading"), "{}", stderr(&result));
    let weights = fixture("dino_vit");
    let args = ["run", s(&cat), "--out", s(&by_path), "--size", "64", "--weights", s(&weights)];
    assert_eq!(output(&mut segattn(home.path(), NO_NETWORK, &args)).status.code(), Some(0));
    let reference = std::fs::read(&by_path).unwrap();
    assert_eq!(std::fs::read(&first).unwrap(), reference);
    assert_eq!(std::fs::read(&second).unwrap(), reference);

    // With no Hub to reach, the first use fails on one line and writes nothing.
    let other = tempfile::tempdir().unwrap();
    let args = ["run", s(&cat), "--out", s(&first), "--size", "64", "--model", "dino-vits8"];
    let _ = std::fs::remove_file(&first);
    let unreachable = output(&mut segattn(other.path(), NO_NETWORK, &args));
    assert_eq!(unreachable.status.code(), Some(2), "{}", stderr(&unreachable));
    assert_eq!(stderr(&unreachable).trim().lines().count(), 2, "{}", stderr(&unreachable));
    assert!(!first.exists());
}

#[test]
fn repository_with_only_a_pytorch_pickle_is_fetched_and_used() {
    let hub = standard_hub();
    let home = tempfile::tempdir().unwrap();
    // HF_HUB_CACHE names the cache directory itself, overriding $HF_HOME/hub.
    let cache = home.path().join("elsewhere");
    let with_cache = |endpoint: &str, args: &[&str]| {
        let mut cmd = segattn(home.path(), endpoint, args);
        cmd.env("HF_HUB_CACHE", &cache);
        cmd
    };
    let fetched = output(&mut with_cache(&hub.endpoint, &["fetch", "someone/vit-pickle"]));
    assert_eq!(fetched.status.code(), Some(0), "{}", stderr(&fetched));
    let snapshot_dir = cache.join("models--someone--vit-pickle/snapshots").join(COMMIT);
    assert!(snapshot_dir.join("pytorch_model.bin").is_file());
    assert!(!home.path().join("hub").exists());

    let dir = tempfile::tempdir().unwrap();
    let cat = sample("cat.jpg");
    let (pickle, safetensors) = (dir.path().join("pickle.png"), dir.path().join("safetensors.png"));
    let args = ["run", s(&cat), "--out", s(&pickle), "--size", "64", "--model", "someone/vit-pickle"];
    let result = output(with_cache(NO_NETWORK, &args).env("HF_HUB_OFFLINE", "1"));
    assert_eq!(result.status.code(), Some(0), "{}", stderr(&result));
    let weights = fixture("dino_vit");
    let args = ["run", s(&cat), "--out", s(&safetensors), "--size", "64", "--weights", s(&weights)];
    assert_eq!(output(&mut segattn(home.path(), NO_NETWORK, &args)).status.code(), Some(0));
    assert_eq!(std::fs::read(&pickle).unwrap(), std::fs::read(&safetensors).unwrap());

    let list = output(&mut with_cache(NO_NETWORK, &["list"]));
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(text.lines().any(|l| l.starts_with("someone/vit-pickle") && l.contains("MB")), "{text}");
}

#[test]
fn unknown_and_missing_models_are_explained() {
    let hub = standard_hub();
    let home = tempfile::tempdir().unwrap();
    let missing = output(&mut segattn(home.path(), &hub.endpoint, &["fetch", "facebook/no-such-model"]));
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        stderr(&missing).contains("facebook/no-such-model: no such model on http://127.0.0.1"),
        "{}",
        stderr(&missing)
    );
    assert!(!home.path().join("hub/models--facebook--no-such-model/snapshots").exists());

    let unknown = output(&mut segattn(home.path(), &hub.endpoint, &["fetch", "dino-vitx99"]));
    assert_eq!(unknown.status.code(), Some(2));
    assert!(stderr(&unknown).contains("unknown model `dino-vitx99`: use one of dino-vits8"), "{}", stderr(&unknown));

    let cat = sample("cat.jpg");
    let out = home.path().join("mask.png");
    // Not cached and offline (by flag or environment): one line that says how to get it.
    let args = ["run", s(&cat), "--out", s(&out), "--model", "dino-vitb16", "--offline"];
    for not_cached in [output(&mut segattn(home.path(), NO_NETWORK, &args)), {
        let args = &args[..args.len() - 1];
        output(segattn(home.path(), NO_NETWORK, args).env("HF_HUB_OFFLINE", "1"))
    }] {
        assert_eq!(not_cached.status.code(), Some(2));
        let message = stderr(&not_cached);
        assert!(message.contains("`dino-vitb16` (facebook/dino-vitb16) is not in the Hugging Face cache"), "{message}");
        assert!(message.contains("network is off (--offline or HF_HUB_OFFLINE)"), "{message}");
        assert!(message.contains("run `segattn fetch dino-vitb16` where the Hub is reachable"), "{message}");
        assert_eq!(message.lines().count(), 1, "{message}");
    }
    assert!(!out.exists());

    let offline = output(segattn(home.path(), &hub.endpoint, &["fetch", "dino-vits8"]).env("HF_HUB_OFFLINE", "1"));
    assert_eq!(offline.status.code(), Some(1));
    assert!(stderr(&offline).contains("HF_HUB_OFFLINE is set and `dino-vits8`"), "{}", stderr(&offline));
    assert!(!hub.requests().iter().any(|r| r.contains("dino-vits8")), "offline mode used the network");
}

#[test]
fn dropped_connection_leaves_no_corrupt_file_and_the_next_fetch_resumes() {
    let hub = standard_hub();
    let home = tempfile::tempdir().unwrap();
    hub.drops_left.store(usize::MAX, Ordering::SeqCst);
    let failed = output(&mut segattn(home.path(), &hub.endpoint, &["fetch", "dino-vits8"]));
    assert_eq!(failed.status.code(), Some(1));
    let message = stderr(&failed);
    assert!(message.contains("facebook/dino-vits8/model.safetensors: download failed"), "{message}");
    assert!(message.contains("`segattn fetch dino-vits8` resumes it"), "{message}");
    // config.json is shorter than the cut and arrives whole; the weights exist
    // only as a partial file, named as such, that no reader takes for the model.
    let snapshot_dir = snapshot(home.path(), "facebook/dino-vits8");
    assert!(!snapshot_dir.join("model.safetensors").exists());
    let weights = std::fs::read(fixture("dino_vit/model.safetensors")).unwrap();
    let blobs = home.path().join("hub/models--facebook--dino-vits8/blobs");
    let mut partial = 0;
    for blob in std::fs::read_dir(&blobs).unwrap() {
        let path = blob.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        if name.ends_with(".part") {
            partial = std::fs::metadata(&path).unwrap().len();
        } else if !name.ends_with(".lock") {
            assert_ne!(std::fs::metadata(&path).unwrap().len() as usize, weights.len(), "{name} is the weights");
        }
    }
    assert!(partial > 0 && partial < weights.len() as u64, "partial download of {partial} bytes");
    let cat = sample("cat.jpg");
    let out = home.path().join("mask.png");
    let args = ["run", s(&cat), "--out", s(&out), "--model", "dino-vits8", "--offline"];
    let run = output(&mut segattn(home.path(), NO_NETWORK, &args));
    assert_eq!(run.status.code(), Some(2));
    assert!(stderr(&run).contains("is not in the Hugging Face cache"));

    // One more cut, then a good connection: the download resumes and completes.
    hub.drops_left.store(1, Ordering::SeqCst);
    let before = hub.requests().len();
    let resumed = output(&mut segattn(home.path(), &hub.endpoint, &["fetch", "dino-vits8"]));
    assert_eq!(resumed.status.code(), Some(0), "{}", stderr(&resumed));
    for file in ["model.safetensors", "config.json"] {
        assert_eq!(
            std::fs::read(snapshot_dir.join(file)).unwrap(),
            std::fs::read(fixture("dino_vit").join(file)).unwrap()
        );
    }
    let first_download = hub.requests()[before..]
        .iter()
        .find(|r| r.contains("model.safetensors") && !r.ends_with("bytes=0-0"))
        .cloned()
        .unwrap();
    assert!(first_download.ends_with(&format!("bytes={partial}-")), "did not resume: {first_download}");
}

#[test]
fn unwritable_cache_is_reported() {
    let hub = standard_hub();
    let dir = tempfile::tempdir().unwrap();
    // A file where the cache directory should be: nobody, root included, can create the cache there.
    let home = dir.path().join("not-a-directory");
    std::fs::write(&home, b"").unwrap();
    let failed = output(&mut segattn(&home, &hub.endpoint, &["fetch", "dino-vits8"]));
    assert_eq!(failed.status.code(), Some(1));
    let message = stderr(&failed);
    assert!(
        message.contains("cannot write to the Hugging Face cache") && message.contains("not-a-directory"),
        "{message}"
    );
    assert_eq!(message.lines().count(), 1, "{message}");
}
