//! Writing outputs: each file under a temporary name in its directory, moved
//! into place only once every output of the same input is ready, so a reader
//! never sees half a PNG and a failed input leaves none of its outputs.
//! Temporary files not yet moved are listed, so a signal handler can remove
//! them before the process exits.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use anyhow::{Context, Result, bail};
use tempfile::NamedTempFile;

const TEMP_PREFIX: &str = ".segattn-";
const TEMP_SUFFIX: &str = ".tmp";

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
    /// A path the user named is written as `cp` writes: a regular file is
    /// replaced, a FIFO or a character device (a pipe, `/dev/stdout`) is
    /// written into, a symbolic link is followed to what it names. Anything
    /// else (a directory, a socket, a block device) is an error.
    Replace,
    /// Earlier outputs in a directory: a regular file is replaced; anything
    /// else there (a link, a FIFO, a device) is an error, left as it is.
    ReplaceFiles,
    /// The input fails and the file is left as it is.
    Keep,
    /// The file is left as it is and its input counts as done: another run
    /// wrote it meanwhile.
    Skip,
}

/// What [`OutputSet::commit`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    Written,
    /// Under [`Existing::Skip`], an output was found written meanwhile: none
    /// of this set's files were placed.
    FoundWritten,
}

/// How an output reaches its path.
enum Destination {
    /// Staged under a temporary name in the directory, then renamed over.
    Renamed(PathBuf),
    /// Written into the FIFO or character device that is there, at commit.
    Into(PathBuf),
}

/// Decides how `path` is written under `existing`, following symbolic links
/// only where the user named the path. Nothing is opened: a FIFO would
/// block.
fn destination(path: &Path, existing: Existing) -> Result<Destination> {
    use std::os::unix::fs::FileTypeExt;
    let kind = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta.file_type(),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Destination::Renamed(path.to_path_buf())),
        Err(err) => return Err(err).with_context(|| format!("{}: cannot look at what is there", path.display())),
    };
    if kind.is_file() || matches!(existing, Existing::Keep | Existing::Skip) {
        // Kept ones fail at commit, which never moves over an existing name.
        return Ok(Destination::Renamed(path.to_path_buf()));
    }
    let what = if kind.is_symlink() {
        "a symbolic link"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_dir() {
        "a directory"
    } else if kind.is_block_device() {
        "a block device"
    } else {
        "not a regular file"
    };
    match existing {
        Existing::Replace if kind.is_symlink() => {
            let target = std::fs::canonicalize(path)
                .with_context(|| format!("{}: a symbolic link to nothing that can be written", path.display()))?;
            destination(&target, existing)
        }
        Existing::Replace if kind.is_fifo() || kind.is_char_device() => Ok(Destination::Into(path.to_path_buf())),
        Existing::Replace => bail!("{}: {what}, not a file; left as it is", path.display()),
        _ => bail!("{}: {what}, not a file segattn wrote; left as it is", path.display()),
    }
}

/// The outputs of one input, written together by [`OutputSet::commit`].
pub struct OutputSet {
    existing: Existing,
    files: Vec<(NamedTempFile, PathBuf)>,
    into: Vec<(PathBuf, Vec<u8>)>,
    stdout: Option<Vec<u8>>,
}

impl OutputSet {
    pub fn new(existing: Existing) -> Self {
        OutputSet { existing, files: Vec::new(), into: Vec::new(), stdout: None }
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
        let path = match destination(path, self.existing)? {
            Destination::Renamed(path) => path,
            Destination::Into(path) => {
                self.into.push((path, bytes));
                return Ok(());
            }
        };
        let path = &path;
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

    /// Moves every staged file into place, then writes into FIFOs and
    /// devices, then standard output. If a file cannot be moved, those
    /// already moved are removed again; under [`Existing::Skip`] an output
    /// another run wrote meanwhile is left as it is, and the rest placed.
    pub fn commit(mut self) -> Result<Committed> {
        let files = std::mem::take(&mut self.files);
        let mut committed = Committed::Written;
        {
            let mut pending = pending();
            let mut placed: Vec<PathBuf> = Vec::new();
            let mut files = files.into_iter();
            while let Some((temp, path)) = files.next() {
                let temp_path = temp.path().to_path_buf();
                let moved = match self.existing {
                    Existing::Replace | Existing::ReplaceFiles => temp.persist(&path),
                    Existing::Keep | Existing::Skip => temp.persist_noclobber(&path),
                };
                match moved {
                    Ok(_) => {
                        pending.retain(|p| *p != temp_path);
                        placed.push(path);
                    }
                    Err(err) => {
                        let exists = err.error.kind() == std::io::ErrorKind::AlreadyExists;
                        discard(&mut pending, err.file);
                        if exists && self.existing == Existing::Skip {
                            committed = Committed::FoundWritten;
                            continue;
                        }
                        let reason = if exists {
                            "already exists (written meanwhile by another run?); left as it is".to_string()
                        } else {
                            format!("cannot write: {}", err.error)
                        };
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
        for (path, bytes) in std::mem::take(&mut self.into) {
            std::fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(&path)
                .and_then(|mut file| file.write_all(&bytes))
                .with_context(|| format!("{}: cannot write", path.display()))?;
        }
        if let Some(bytes) = self.stdout.take() {
            write_stdout(&bytes)?;
        }
        Ok(committed)
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

/// Removes temporary files in `dir` that a killed process left behind.
pub fn remove_stale_temp_files(dir: &Path) {
    crate::temp_files::remove_stale(dir, |name| name.starts_with(TEMP_PREFIX) && name.ends_with(TEMP_SUFFIX));
}

/// Writes one file atomically, replacing what is there.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut set = OutputSet::new(Existing::Replace);
    set.add(&Sink::File(path.to_path_buf()), bytes.to_vec())?;
    set.commit().map(drop)
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
        let blocked = dir.path().join("overlay.png");
        let mut set = OutputSet::new(Existing::Replace);
        set.add(&Sink::File(good.clone()), b"mask".to_vec()).unwrap();
        set.add(&Sink::File(blocked.clone()), b"overlay".to_vec()).unwrap();
        // A directory made where the second output goes, after it was staged: moving onto it fails.
        std::fs::create_dir(&blocked).unwrap();
        std::fs::write(blocked.join("inside"), b"x").unwrap();
        let listed = || pending().iter().filter(|p| p.starts_with(dir.path())).count();
        assert_eq!(listed(), 2);
        let err = set.commit().unwrap_err().to_string();
        assert!(err.contains("overlay.png"), "{err}");
        assert_eq!(names(dir.path()), ["overlay.png"]);
        assert_eq!(names(&blocked), ["inside"]);
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
    fn skip_leaves_an_output_written_meanwhile_and_places_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let (mask, overlay) = (dir.path().join("mask.png"), dir.path().join("overlay.png"));
        let mut set = OutputSet::new(Existing::Skip);
        set.add(&Sink::File(mask.clone()), b"ours".to_vec()).unwrap();
        set.add(&Sink::File(overlay.clone()), b"ours".to_vec()).unwrap();
        std::fs::write(&mask, b"theirs").unwrap();
        assert_eq!(set.commit().unwrap(), Committed::FoundWritten);
        assert_eq!(std::fs::read(&mask).unwrap(), b"theirs");
        assert_eq!(std::fs::read(&overlay).unwrap(), b"ours");
        assert_eq!(names(dir.path()), ["mask.png", "overlay.png"]);
        // Under Keep the same race is the input's error, and nothing of it stays.
        let mut set = OutputSet::new(Existing::Keep);
        let other = dir.path().join("other.png");
        set.add(&Sink::File(other.clone()), b"ours".to_vec()).unwrap();
        set.add(&Sink::File(mask.clone()), b"ours".to_vec()).unwrap();
        assert!(set.commit().unwrap_err().to_string().contains("already exists"));
        assert_eq!(names(dir.path()), ["mask.png", "overlay.png"]);
    }

    #[test]
    fn only_old_temporary_files_of_ours_are_stale() {
        let dir = tempfile::tempdir().unwrap();
        for name in [".segattn-old.tmp", ".segattn-new.tmp", "photo.tmp"] {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        for name in [".segattn-old.tmp", "photo.tmp"] {
            std::fs::File::options().write(true).open(dir.path().join(name)).unwrap().set_modified(hour_ago).unwrap();
        }
        remove_stale_temp_files(dir.path());
        assert_eq!(names(dir.path()), [".segattn-new.tmp", "photo.tmp"]);
    }
}
