//! From the command line's inputs to work items: expanding directories,
//! naming outputs, and refusing outputs that would overwrite an input.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::BatchArgs;
use crate::image_io::{Sink, Source};

const IMAGE_EXTENSIONS: [&str; 9] = ["jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "jfif"];

/// One input and where its outputs go.
#[derive(Debug, Clone)]
pub struct Job {
    pub source: Source,
    /// The main output (mask or heat map).
    pub out: Sink,
    /// Extra outputs by kind (`overlay`, `cutout`), when asked for.
    pub extra: Vec<(&'static str, PathBuf)>,
}

/// An input that failed before any work started (e.g. it does not exist).
#[derive(Debug)]
pub struct Rejected {
    pub name: String,
    pub reason: String,
}

/// An extra output: a file with a single input, a directory with --out-dir.
pub struct ExtraOutput<'a> {
    pub kind: &'static str,
    pub path: &'a Path,
}

fn is_image_file(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Image files in `dir` (and below, with `recursive`), sorted, each with its
/// path relative to `root`. Each directory is read once, known by device and
/// inode, so symbolic links that loop back are not followed round again.
fn list_dir(
    dir: &Path,
    recursive: bool,
    found: &mut Vec<(PathBuf, PathBuf)>,
    root: &Path,
    visited: &mut HashSet<(u64, u64)>,
) -> std::io::Result<()> {
    let meta = std::fs::metadata(dir)?;
    if !visited.insert((meta.dev(), meta.ino())) {
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>()?;
    entries.sort();
    for path in entries {
        if path.is_dir() {
            if recursive {
                list_dir(&path, recursive, found, root, visited)?;
            }
        } else if is_image_file(&path) {
            let relative = path.strip_prefix(root).unwrap_or(&path).to_path_buf();
            found.push((path, relative));
        }
    }
    Ok(())
}

/// Resolves a path that may not exist yet to a comparable absolute form.
fn comparable(path: &Path) -> Option<PathBuf> {
    if let Ok(path) = path.canonicalize() {
        return Some(path);
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    Some(parent.canonicalize().ok()?.join(path.file_name()?))
}

/// Expands `args.inputs` into jobs. Usage mistakes are errors; inputs that
/// cannot be used are returned as rejections so the batch can go on.
pub fn plan(args: &BatchArgs, extras: &[ExtraOutput]) -> Result<(Vec<Job>, Vec<Rejected>)> {
    let mut rejected = Vec::new();
    // (source, output stem relative to the output directory)
    let mut sources: Vec<(Source, PathBuf)> = Vec::new();
    for input in &args.inputs {
        let source = Source::from_arg(input);
        match &source {
            Source::Stdin => sources.push((source, PathBuf::from("stdin"))),
            Source::File(path) if path.is_dir() => {
                let mut found = Vec::new();
                match list_dir(path, args.recursive, &mut found, path, &mut HashSet::new()) {
                    Ok(()) if found.is_empty() => {
                        let below = if args.recursive { " or below it" } else { " (--recursive looks below it)" };
                        let reason = format!("no photos ({}) in this directory{below}", IMAGE_EXTENSIONS.join(", "));
                        rejected.push(Rejected { name: path.display().to_string(), reason })
                    }
                    Ok(()) => {
                        sources.extend(found.into_iter().map(|(p, rel)| (Source::File(p), rel.with_extension(""))))
                    }
                    Err(err) => rejected.push(Rejected { name: path.display().to_string(), reason: err.to_string() }),
                }
            }
            Source::File(path) if !path.exists() => {
                rejected.push(Rejected { name: path.display().to_string(), reason: "no such file".into() })
            }
            Source::File(path) => {
                let stem = path.file_stem().map(PathBuf::from).unwrap_or_else(|| PathBuf::from("image"));
                sources.push((source, stem));
            }
        }
    }
    if sources.iter().filter(|(s, _)| *s == Source::Stdin).count() > 1 {
        bail!("standard input (-) can be read only once");
    }

    let jobs = match (&args.out, &args.out_dir) {
        (Some(out), None) => {
            let single_file = args.inputs.len() == 1 && !args.inputs[0].is_dir();
            if !single_file {
                bail!("--out names one file, for one input; use --out-dir DIR for several inputs or a directory");
            }
            sources
                .into_iter()
                .map(|(source, _)| Job {
                    source,
                    out: Sink::from_arg(out),
                    extra: extras.iter().map(|e| (e.kind, e.path.to_path_buf())).collect(),
                })
                .collect()
        }
        (None, Some(dir)) => {
            if sources.iter().any(|(s, _)| *s == Source::Stdin) {
                bail!("standard input (-) needs --out FILE (or --out - for standard output)");
            }
            let name = |base: &Path, stem: &Path| {
                let mut file = stem.as_os_str().to_os_string();
                file.push(&args.suffix);
                file.push(".png");
                base.join(file)
            };
            sources
                .into_iter()
                .map(|(source, stem)| Job {
                    out: Sink::File(name(dir, &stem)),
                    extra: extras.iter().map(|e| (e.kind, name(e.path, &stem))).collect(),
                    source,
                })
                .collect()
        }
        _ => bail!("give --out FILE (one input) or --out-dir DIR"),
    };
    let jobs = check_outputs(jobs, &mut rejected)?;
    Ok((jobs, rejected))
}

/// Creates output directories and drops jobs whose output would overwrite
/// another job's output, recording why. Writing over an input is a usage error.
fn check_outputs(jobs: Vec<Job>, rejected: &mut Vec<Rejected>) -> Result<Vec<Job>> {
    let inputs: HashSet<PathBuf> = jobs
        .iter()
        .filter_map(|j| match &j.source {
            Source::File(p) => comparable(p),
            Source::Stdin => None,
        })
        .collect();
    let mut claimed: HashMap<PathBuf, String> = HashMap::new();
    let mut kept = Vec::with_capacity(jobs.len());
    'jobs: for job in jobs {
        let name = job.source.display_name();
        let outputs = std::iter::once(match &job.out {
            Sink::File(p) => Some(p.as_path()),
            Sink::Stdout => None,
        })
        .flatten()
        .chain(job.extra.iter().map(|(_, p)| p.as_path()));
        for output in outputs {
            if let Some(dir) = output.parent().filter(|d| !d.as_os_str().is_empty())
                && let Err(err) = std::fs::create_dir_all(dir)
            {
                rejected.push(Rejected { name, reason: format!("cannot create {}: {err}", dir.display()) });
                continue 'jobs;
            }
            let Some(key) = comparable(output) else {
                continue;
            };
            if inputs.contains(&key) {
                bail!("refusing to write {} over an input", output.display());
            }
            if let Some(other) = claimed.get(&key) {
                let reason = format!("output {} is already written for {other}", output.display());
                rejected.push(Rejected { name, reason });
                continue 'jobs;
            }
            claimed.insert(key, name.clone());
        }
        kept.push(job);
    }
    Ok(kept)
}

/// Fails when `output` is one of `inputs`, by whatever path: a command never
/// writes over a file it reads, its model and head included.
pub fn refuse_overwrite<'a>(output: &Path, inputs: impl IntoIterator<Item = &'a Path>) -> Result<()> {
    let Some(target) = comparable(output) else {
        return Ok(());
    };
    for input in inputs {
        if input.is_file() && comparable(input).as_ref() == Some(&target) {
            bail!("refusing to write {} over {}, one of this command's inputs", output.display(), input.display());
        }
    }
    Ok(())
}

/// A photo and its ground-truth mask, matched by file stem.
pub struct Pair {
    pub stem: String,
    pub image: PathBuf,
    pub mask: PathBuf,
}

/// Image files of `dir` by stem.
fn by_stem(dir: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let mut found = Vec::new();
    list_dir(dir, false, &mut found, dir, &mut HashSet::new())
        .with_context(|| format!("{}: cannot list directory", dir.display()))?;
    Ok(found
        .into_iter()
        .filter_map(|(path, _)| Some((path.file_stem()?.to_string_lossy().into_owned(), path)))
        .collect())
}

/// Photos in `images` matched to masks in `masks` by stem, sorted, and a
/// line for each file left without a partner. No pair at all is an error.
pub fn pair_by_stem(images: &Path, masks: &Path) -> Result<(Vec<Pair>, Vec<String>)> {
    let photos = by_stem(images)?;
    let mut truths = by_stem(masks)?;
    let mut pairs = Vec::new();
    let mut missing = Vec::new();
    for (stem, image) in photos {
        match truths.remove(&stem) {
            Some(mask) => pairs.push(Pair { stem, image, mask }),
            None => missing.push(format!("{}: no mask named {stem}.* in {}", image.display(), masks.display())),
        }
    }
    missing
        .extend(truths.values().map(|m| format!("{}: no photo with this stem in {}", m.display(), images.display())));
    if pairs.is_empty() {
        bail!("no photo/mask pairs: {} and {} share no file stems", images.display(), masks.display());
    }
    Ok((pairs, missing))
}
