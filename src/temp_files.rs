//! Temporary files a killed process left behind. segattn writes each file
//! to a temporary name beside it and renames it into place; a `kill -9`
//! between the two leaves the temporary file, which the next run writing
//! to that folder removes: only regular files, only names segattn makes,
//! only once older than any write takes.

use std::fs::DirEntry;
use std::path::Path;
use std::time::{Duration, SystemTime};

/// Older than this, a temporary file is no write in progress.
pub const STALE_AFTER: Duration = Duration::from_secs(600);

/// Removes the regular files of `dir` whose names `ours` accepts and that
/// were last written over [`STALE_AFTER`] ago.
pub fn remove_stale(dir: &Path, ours: impl Fn(&str) -> bool) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        remove_if_stale(&entry, &ours);
    }
}

/// For a caller that lists the folder anyway: removes `entry` if it is a
/// regular file whose name `ours` accepts, last written over
/// [`STALE_AFTER`] ago. Returns whether `ours` accepts its name.
pub fn remove_if_stale(entry: &DirEntry, ours: impl Fn(&str) -> bool) -> bool {
    if !ours(&entry.file_name().to_string_lossy()) {
        return false;
    }
    // The entry itself, not what a link names: a link is never ours.
    if let Ok(meta) = entry.metadata() {
        let now = SystemTime::now();
        let old = meta.modified().is_ok_and(|t| now.duration_since(t).is_ok_and(|age| age > STALE_AFTER));
        if old && meta.file_type().is_file() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_old_regular_files_of_ours_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let aged = |name: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, b"x").unwrap();
            let past = SystemTime::now() - STALE_AFTER - Duration::from_secs(60);
            std::fs::File::options().write(true).open(&path).unwrap().set_modified(past).unwrap();
            path
        };
        let (old_ours, old_other) = (aged(".tmpA"), aged("photo.png"));
        let fresh = dir.path().join(".tmpB");
        std::fs::write(&fresh, b"x").unwrap();
        let link = dir.path().join(".tmpC");
        std::os::unix::fs::symlink(&old_other, &link).unwrap();
        std::fs::create_dir(dir.path().join(".tmpD")).unwrap();
        remove_stale(dir.path(), |name| name.starts_with(".tmp"));
        assert!(!old_ours.exists());
        assert!(old_other.exists() && fresh.exists() && dir.path().join(".tmpD").is_dir());
        assert!(std::fs::symlink_metadata(&link).is_ok(), "a link is never removed");
    }
}
