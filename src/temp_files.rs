//! Temporary files a killed process left behind. segattn writes each file
//! to a temporary name beside it and renames it into place; a `kill -9`
//! between the two leaves the temporary file, which the next run writing
//! to that folder removes: only regular files, only names segattn makes,
//! only once older than any write takes.

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
    let now = SystemTime::now();
    for entry in entries.flatten() {
        if !ours(&entry.file_name().to_string_lossy()) {
            continue;
        }
        // The entry itself, not what a link names: a link is never ours.
        let Ok(meta) = entry.metadata() else { continue };
        let old = meta.modified().is_ok_and(|t| now.duration_since(t).is_ok_and(|age| age > STALE_AFTER));
        if old && meta.file_type().is_file() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
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
