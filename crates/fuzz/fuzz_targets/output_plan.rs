//! The output planner of `segattn run`, on real directories: the input
//! builds a small tree (photos, earlier outputs, FIFOs, symbolic links,
//! subdirectories) and a command line over it, and the plan must keep the
//! README's rules: planning changes no file, no output replaces an input
//! or another job's output, a scanned entry that is not a regular file is
//! never opened, and an existing output is kept unless asked otherwise.
#![no_main]

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsString;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use segattn_fuzz::scratch;

/// Names an entry may have, below the tree's root.
const NAMES: [&str; 16] = [
    "in/a.jpg",
    "in/a.png",
    "in/a_m.png",
    "in/b.JPG",
    "in/b.png",
    "in/sub/a.jpg",
    "in/sub/a.png",
    "in/sub/c.webp",
    "in/sub/sub/d.gif",
    "in/link.jpg",
    "in/e",
    "out/a.png",
    "out/a_m.png",
    "out/sub/a.png",
    "overlay/a.png",
    "cutout/a_m.png",
];

#[derive(Debug, Clone, Copy)]
enum Kind {
    Photo,
    /// A PNG with segattn's tag: an earlier run's output.
    Output,
    Fifo,
    LinkToPhoto,
    Directory,
    /// A link back up to `in`: a loop for --recursive.
    LinkToInput,
    DanglingLink,
}

const KINDS: [Kind; 7] =
    [Kind::Photo, Kind::Output, Kind::Fifo, Kind::LinkToPhoto, Kind::Directory, Kind::LinkToInput, Kind::DanglingLink];

fn tagged_png() -> &'static [u8] {
    static PNG: OnceLock<Vec<u8>> = OnceLock::new();
    PNG.get_or_init(|| segattn::image_io::encode_png(&image::DynamicImage::new_luma8(1, 1)).expect("a PNG"))
}

fn make(root: &Path, name: &str, kind: Kind) {
    let path = root.join(name);
    if std::fs::symlink_metadata(&path).is_ok() || std::fs::create_dir_all(path.parent().expect("below root")).is_err()
    {
        return;
    }
    let _ = match kind {
        Kind::Photo => std::fs::write(&path, b"\xff\xd8\xff not really a JPEG"),
        Kind::Output => std::fs::write(&path, tagged_png()),
        Kind::Fifo => {
            let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("no NUL");
            // SAFETY: a valid NUL-terminated path; mkfifo only creates a file.
            unsafe { libc::mkfifo(c_path.as_ptr(), 0o644) };
            Ok(())
        }
        Kind::LinkToPhoto => std::os::unix::fs::symlink(root.join("in/a.jpg"), &path),
        Kind::Directory => std::fs::create_dir(&path),
        Kind::LinkToInput => std::os::unix::fs::symlink(root.join("in"), &path),
        Kind::DanglingLink => std::os::unix::fs::symlink(root.join("nowhere"), &path),
    };
}

/// What is in the tree: each entry's kind, and a regular file's bytes.
#[derive(Debug, PartialEq, Eq)]
enum Entry {
    File(Vec<u8>),
    Fifo,
    Link(PathBuf),
    Directory,
}

fn snapshot(dir: &Path, into: &mut BTreeMap<PathBuf, Entry>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        let Ok(kind) = entry.file_type() else { continue };
        let state = if kind.is_symlink() {
            Entry::Link(std::fs::read_link(&path).unwrap_or_default())
        } else if kind.is_dir() {
            snapshot(&path, into);
            Entry::Directory
        } else if kind.is_fifo() {
            Entry::Fifo
        } else {
            Entry::File(std::fs::read(&path).unwrap_or_default())
        };
        into.insert(path, state);
    }
}

fn identity(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

fuzz_target!(|bytes: &[u8]| {
    let [flags, places, entries @ ..] = bytes else { return };
    let root = scratch().join("plan");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("in")).expect("scratch directory");
    for pair in entries.chunks_exact(2).take(24) {
        make(&root, NAMES[pair[1] as usize % NAMES.len()], KINDS[pair[0] as usize % KINDS.len()]);
    }

    let flag = |bit: u8| flags & (1 << bit) != 0;
    let single = flag(3);
    let out_dir = ["out", "in", "in/sub", "."][(places & 3) as usize];
    let inputs: Vec<PathBuf> = match (single, (places >> 2) & 3) {
        (true, 0 | 1) => vec![root.join("in/a.jpg")],
        (true, _) => vec![root.join("in/link.jpg")],
        (false, 0) => vec![root.join("in")],
        (false, 1) => vec![root.join("in/a.jpg"), root.join("in/b.JPG"), root.join("in/sub/a.jpg")],
        (false, 2) => vec![root.join("in"), root.join("in/a.jpg")],
        (false, _) => vec![root.join("in"), root.join("in/sub")],
    };
    let mut args: Vec<OsString> = inputs.iter().map(|p| p.clone().into_os_string()).collect();
    let mut option = |name: &str, value: Option<PathBuf>| {
        args.push(name.into());
        args.extend(value.map(PathBuf::into_os_string));
    };
    if single {
        option("--out", Some(root.join(out_dir).join("a.png")));
    } else {
        option("--out-dir", Some(root.join(out_dir)));
    }
    let extra = |dir: &str| if single { root.join(dir).join("a.png") } else { root.join(dir) };
    if flag(0) {
        option("--recursive", None);
    }
    if flag(1) {
        option("--overwrite", None);
    }
    if flag(2) {
        option("--skip-existing", None);
    }
    if flag(4) {
        option("--overlay", Some(extra("overlay")));
    }
    if flag(5) {
        option("--cutout", Some(extra("cutout")));
    }
    if flag(6) {
        args.extend(["--suffix".into(), "_m".into()]);
    }
    if flag(7) {
        args.extend(["--shard".into(), "1/2".into()]);
    }

    let mut before = BTreeMap::new();
    snapshot(&root, &mut before);
    let planned = segattn::cli::plan_run(&args);
    let mut after = BTreeMap::new();
    snapshot(&root, &mut after);
    for (path, was) in &before {
        assert_eq!(after.get(path), Some(was), "planning changed {}", path.display());
    }
    for path in after.keys().filter(|p| !before.contains_key(*p)) {
        assert_eq!(after[path], Entry::Directory, "planning made {}", path.display());
    }
    let Ok(jobs) = planned else { return };

    let named: HashSet<(u64, u64)> = inputs.iter().filter_map(|p| identity(p)).collect();
    let photos: HashSet<(u64, u64)> = jobs.iter().filter_map(|(source, _)| identity(source.as_ref()?)).collect();
    let mut outputs = HashSet::new();
    for (source, files) in &jobs {
        let source = source.as_ref().expect("no standard input here");
        let kind = std::fs::metadata(source).map(|m| m.file_type());
        assert!(
            kind.as_ref().is_ok_and(|k| k.is_file()) || identity(source).is_some_and(|id| named.contains(&id)),
            "{} is not a regular file, and was not named",
            source.display()
        );
        for file in files {
            let key =
                std::fs::canonicalize(file.parent().expect("a file")).expect("made").join(file.file_name().unwrap());
            assert!(outputs.insert(key), "{} is written twice", file.display());
            // Only a regular file is ever replaced (a link in --out-dir, or to
            // a directory, fails as it is written): it must be no input.
            if std::fs::metadata(file).is_ok_and(|m| m.is_file())
                && let Some(id) = identity(file)
            {
                assert!(!photos.contains(&id) && !named.contains(&id), "{} replaces an input", file.display());
            }
            if !single && !flag(1) && !flag(2) {
                assert!(std::fs::symlink_metadata(file).is_err(), "{} exists and would be replaced", file.display());
            }
        }
        if flag(2) && !single {
            assert!(
                files.iter().any(|f| std::fs::symlink_metadata(f).is_err()),
                "nothing left to write for {}",
                source.display()
            );
        }
    }
});
