//! Writing outputs: each file under a temporary name in its directory, moved
//! into place only once every output of the same input is ready, so a reader
//! never sees half a PNG and a failed input leaves none of its outputs.
//! Temporary files not yet moved are listed, so a signal handler can remove
//! them before the process exits.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use tempfile::NamedTempFile;

const TEMP_PREFIX: &str = ".segattn-";
const TEMP_SUFFIX: &str = ".tmp";

/// A temporary file lives for the milliseconds of one write; one older than
/// this was left by a process that was killed outright, and is removed.
const STALE_AFTER: Duration = Duration::from_secs(600);

/// Temporary files that exist and are not yet moved into place. A file is
/// created and listed, or moved and unlisted, under this lock, so the list
/// is never behind the directory.
static PENDING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn pending() -> MutexGuard<'static, Vec<PathBuf>> {
    PENDING.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Where an output goes: a file, or standard output for `-`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sink {
    File(PathBuf),
    Stdout,
}

impl Sink {
    pub fn from_arg(arg: &Path) -> Self {
        if arg == Path::new("-") { Sink::Stdout } else { Sink::File(arg.to_path_buf()) }
    }

    pub fn display_name(&self) -> String {
        match self {
            Sink::File(path) => path.display().to_string(),
            Sink::Stdout => "<stdout>".to_string(),
        }
    }
}

/// What happens to an output file that already exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// It is replaced (a file the user named, or --overwrite).
    Replace,
    /// The input fails and the file is left as it is.
    Keep,
}

/// The outputs of one input, written together by [`OutputSet::commit`].
pub struct OutputSet {
    existing: Existing,
    files: Vec<(NamedTempFile, PathBuf)>,
    stdout: Option<Vec<u8>>,
}

impl OutputSet {
    pub fn new(existing: Existing) -> Self {
        OutputSet { existing, files: Vec::new(), stdout: None }
    }

    /// Stages `bytes` for `sink`: a file is written to a temporary name now;
    /// standard output is written last, at commit.
    pub fn add(&mut self, sink: &Sink, bytes: Vec<u8>) -> Result<()> {
        let path = match sink {
            Sink::Stdout => {
                self.stdout = Some(bytes);
                return Ok(());
            }
            Sink::File(path) => path,
        };
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        let mut temp = {
            let mut pending = pending();
            let temp = tempfile::Builder::new()
                .prefix(TEMP_PREFIX)
                .suffix(TEMP_SUFFIX)
                .tempfile_in(dir)
                .with_context(|| format!("{}: cannot create a file in {}", path.display(), dir.display()))?;
            pending.push(temp.path().to_path_buf());
            temp
        };
        let written = temp.write_all(&bytes).and_then(|()| temp.flush());
        // Temporary files are created private; an output is an ordinary file.
        #[cfg(unix)]
        let written = written.and_then(|()| {
            use std::os::unix::fs::PermissionsExt;
            temp.as_file().set_permissions(std::fs::Permissions::from_mode(0o644))
        });
        let staged = (temp, path.clone());
        if let Err(err) = written {
            discard(&mut pending(), staged.0);
            return Err(err).with_context(|| format!("{}: cannot write", path.display()));
        }
        self.files.push(staged);
        Ok(())
    }

    /// Moves every staged file into place, then writes standard output. If a
    /// file cannot be moved, those already moved are removed again.
    pub fn commit(mut self) -> Result<()> {
        let files = std::mem::take(&mut self.files);
        {
            let mut pending = pending();
            let mut placed: Vec<PathBuf> = Vec::new();
            let mut files = files.into_iter();
            while let Some((temp, path)) = files.next() {
                let temp_path = temp.path().to_path_buf();
                let moved = match self.existing {
                    Existing::Replace => temp.persist(&path),
                    Existing::Keep => temp.persist_noclobber(&path),
                };
                match moved {
                    Ok(_) => {
                        pending.retain(|p| *p != temp_path);
                        placed.push(path);
                    }
                    Err(err) => {
                        let exists = err.error.kind() == std::io::ErrorKind::AlreadyExists;
                        let reason = if exists {
                            "already exists (written meanwhile by another run?); left as it is".to_string()
                        } else {
                            format!("cannot write: {}", err.error)
                        };
                        discard(&mut pending, err.file);
                        for (temp, _) in files {
                            discard(&mut pending, temp);
                        }
                        for done in placed {
                            let _ = std::fs::remove_file(done);
                        }
                        bail!("{}: {reason}", path.display());
                    }
                }
            }
        }
        if let Some(bytes) = self.stdout.take() {
            write_stdout(&bytes)?;
        }
        Ok(())
    }
}

impl Drop for OutputSet {
    fn drop(&mut self) {
        if self.files.is_empty() {
            return;
        }
        let mut pending = pending();
        for (temp, _) in self.files.drain(..) {
            discard(&mut pending, temp);
        }
    }
}

/// Removes a staged file and its entry in the list.
fn discard(pending: &mut Vec<PathBuf>, temp: NamedTempFile) {
    let path = temp.path().to_path_buf();
    let _ = temp.close();
    pending.retain(|p| *p != path);
}

/// For a signal handler: removes every temporary file not yet moved into
/// place and exits with `code`. The list stays locked until the process
/// ends, so no worker starts another file meanwhile.
pub fn abandon_pending_outputs_and_exit(code: i32) -> ! {
    let pending = pending();
    for path in pending.iter() {
        let _ = std::fs::remove_file(path);
    }
    std::process::exit(code)
}

/// Removes temporary files in `dir` that a killed process left behind:
/// segattn's own names, older than any write takes.
pub fn remove_stale_temp_files(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let now = SystemTime::now();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !(name.starts_with(TEMP_PREFIX) && name.ends_with(TEMP_SUFFIX)) {
            continue;
        }
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| now.duration_since(t).is_ok_and(|age| age > STALE_AFTER));
        if old && entry.file_type().is_ok_and(|t| t.is_file()) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Writes one file atomically, replacing what is there.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut set = OutputSet::new(Existing::Replace);
    set.add(&Sink::File(path.to_path_buf()), bytes.to_vec())?;
    set.commit()
}

/// Writes `bytes` to standard output, unbuffered. A write that fails is an
/// error, and so is a standard output that was closed when segattn started:
/// Rust's runtime reopens a closed descriptor on /dev/null (read-write,
/// which a shell's `>/dev/null` never is), and the output would vanish.
pub fn write_stdout(bytes: &[u8]) -> Result<()> {
    if stdout_was_closed() {
        bail!("standard output is closed");
    }
    let mut out = std::io::stdout().lock();
    out.write_all(bytes).and_then(|()| out.flush()).context("cannot write to standard output")
}

/// Decided once: a descriptor closed at start-up stays as the runtime left it.
#[cfg(target_os = "linux")]
fn stdout_was_closed() -> bool {
    static CLOSED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *CLOSED.get_or_init(stdout_is_runtime_null)
}

#[cfg(target_os = "linux")]
fn stdout_is_runtime_null() -> bool {
    let on_null = std::fs::read_link("/proc/self/fd/1").is_ok_and(|p| p == Path::new("/dev/null"));
    let read_write = || {
        let info = std::fs::read_to_string("/proc/self/fdinfo/1").unwrap_or_default();
        let flags = info.lines().find_map(|l| l.strip_prefix("flags:")).map(str::trim).unwrap_or("");
        u32::from_str_radix(flags, 8).is_ok_and(|f| f & libc::O_ACCMODE as u32 == libc::O_RDWR as u32)
    };
    on_null && read_write()
}

#[cfg(not(target_os = "linux"))]
fn stdout_was_closed() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    #[test]
    fn a_failed_commit_leaves_no_output_and_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("mask.png");
        // A directory where the second output should go: moving onto it fails.
        let blocked = dir.path().join("overlay.png");
        std::fs::create_dir(&blocked).unwrap();
        let mut set = OutputSet::new(Existing::Replace);
        set.add(&Sink::File(good.clone()), b"mask".to_vec()).unwrap();
        set.add(&Sink::File(blocked.clone()), b"overlay".to_vec()).unwrap();
        let listed = || pending().iter().filter(|p| p.starts_with(dir.path())).count();
        assert_eq!(listed(), 2);
        let err = set.commit().unwrap_err().to_string();
        assert!(err.contains("overlay.png"), "{err}");
        assert_eq!(names(dir.path()), ["overlay.png"]);
        assert_eq!(listed(), 0);
    }

    #[test]
    fn keep_leaves_an_existing_file_and_replace_replaces_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mask.png");
        std::fs::write(&path, b"first").unwrap();
        let mut keep = OutputSet::new(Existing::Keep);
        keep.add(&Sink::File(path.clone()), b"second".to_vec()).unwrap();
        assert!(keep.commit().unwrap_err().to_string().contains("already exists"));
        assert_eq!(std::fs::read(&path).unwrap(), b"first");
        write_atomic(&path, b"third").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"third");
        assert_eq!(names(dir.path()), ["mask.png"]);
    }

    #[test]
    fn only_old_temporary_files_of_ours_are_stale() {
        let dir = tempfile::tempdir().unwrap();
        for name in [".segattn-old.tmp", ".segattn-new.tmp", "photo.tmp"] {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        let hour_ago = SystemTime::now() - Duration::from_secs(3600);
        for name in [".segattn-old.tmp", "photo.tmp"] {
            std::fs::File::options().write(true).open(dir.path().join(name)).unwrap().set_modified(hour_ago).unwrap();
        }
        remove_stale_temp_files(dir.path());
        assert_eq!(names(dir.path()), [".segattn-new.tmp", "photo.tmp"]);
    }
}
