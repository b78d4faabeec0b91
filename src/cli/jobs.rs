//! From the command line's inputs to work items: expanding directories,
//! naming outputs, and refusing outputs that would overwrite an input.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use image::DynamicImage;

use super::BatchArgs;
use super::output::{self, Committed, Existing, OutputSet, Sink};
use crate::image_io::{self, Source};

const IMAGE_EXTENSIONS: [&str; 9] = ["jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "jfif"];

/// One input and where its outputs go.
#[derive(Debug, Clone)]
pub struct Job {
    pub source: Source,
    /// The main output (mask or heat map).
    pub out: Sink,
    /// Extra outputs, when asked for.
    pub extra: Vec<(Extra, PathBuf)>,
    /// Outputs that exist already and stay as they are (--skip-existing).
    kept: Vec<PathBuf>,
    existing: Existing,
}

impl Job {
    /// A writer for this job's outputs, which moves them into place together.
    pub fn writer(&self) -> JobWriter<'_> {
        JobWriter { kept: &self.kept, set: OutputSet::new(self.existing) }
    }

    pub fn output_files(&self) -> impl Iterator<Item = &Path> {
        let main = match &self.out {
            Sink::File(p) => Some(p.as_path()),
            Sink::Stdout => None,
        };
        main.into_iter().chain(self.extra.iter().map(|(_, p)| p.as_path()))
    }
}

/// Stages a job's outputs; [`JobWriter::commit`] moves them all into place.
pub struct JobWriter<'a> {
    kept: &'a [PathBuf],
    set: OutputSet,
}

impl JobWriter<'_> {
    /// Encodes `image` as PNG for `sink`, unless that output is kept.
    pub fn png(&mut self, image: &DynamicImage, sink: &Sink) -> Result<()> {
        if matches!(sink, Sink::File(path) if self.kept.contains(path)) {
            return Ok(());
        }
        self.set.add(sink, image_io::encode_png(image)?)
    }

    pub fn commit(self) -> Result<Committed> {
        self.set.commit()
    }
}

/// An input that failed before any work started (e.g. it does not exist).
#[derive(Debug)]
pub struct Rejected {
    pub name: String,
    pub reason: String,
}

/// Pictures `run` writes beside the mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extra {
    /// The photo with the mask tinted and outlined.
    Overlay,
    /// The photo with a transparent background.
    Cutout,
}

impl Extra {
    /// Its key in the JSON record.
    pub fn name(self) -> &'static str {
        match self {
            Extra::Overlay => "overlay",
            Extra::Cutout => "cutout",
        }
    }
}

/// An extra output: a file with a single input, a directory with --out-dir.
pub struct ExtraOutput<'a> {
    pub kind: Extra,
    pub path: &'a Path,
}

/// What a batch will do.
pub struct Plan {
    pub jobs: Vec<Job>,
    pub rejected: Vec<Rejected>,
    /// Inputs whose outputs all exist (--skip-existing).
    pub skipped: Vec<String>,
    /// Photos found in all shards together, when --shard is given.
    pub all_shards: Option<usize>,
}

fn is_image_file(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// What a directory scan found.
#[derive(Default)]
struct Listing {
    /// Image files, sorted, each with its path relative to the scanned root.
    photos: Vec<(PathBuf, PathBuf)>,
    /// Entries with an image's name that are not regular files (a FIFO
    /// would block the batch in `open`), to report and skip.
    not_files: Vec<PathBuf>,
}

/// Image files in `dir` (and below, with `recursive`). Each directory is
/// read once, known by device and inode, so symbolic links that loop back
/// are not followed round again.
fn list_dir(
    dir: &Path,
    recursive: bool,
    found: &mut Listing,
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
        } else if is_image_file(&path) && !path.is_file() {
            found.not_files.push(path);
        } else if is_image_file(&path) {
            let relative = path.strip_prefix(root).unwrap_or(&path).to_path_buf();
            found.photos.push((path, relative));
        }
    }
    Ok(())
}

/// Resolves a path, existing or not yet, to a comparable absolute form: its
/// longest existing ancestor resolved (links and all), the rest as written.
/// `None` for a path that steps up (`..`) out of a folder not there yet.
fn comparable(path: &Path) -> Option<PathBuf> {
    if let Ok(resolved) = path.canonicalize() {
        return Some(resolved);
    }
    let absolute = if path.is_absolute() { path.to_path_buf() } else { std::env::current_dir().ok()?.join(path) };
    let mut missing = Vec::new();
    let mut existing = absolute.as_path();
    let resolved = loop {
        if let Ok(resolved) = existing.canonicalize() {
            break resolved;
        }
        missing.push(existing.file_name()?);
        existing = existing.parent()?;
    };
    Some(missing.iter().rev().fold(resolved, |path, name| path.join(name)))
}

/// An input before its outputs are checked.
struct Candidate {
    job: Job,
    /// What --shard hashes: the path below the input directory, or the
    /// argument as given.
    shard_key: Vec<u8>,
    /// Found in a directory rather than named on the command line.
    listed: bool,
}

/// Expands `args.inputs` into jobs. Usage mistakes are errors; inputs that
/// cannot be used are returned as rejections so the batch can go on.
///
/// The rules for outputs: none may replace an input (that is an error);
/// two inputs may not share one; an existing file in --out-dir is kept
/// (the input fails) unless --overwrite or --skip-existing says otherwise,
/// while a file named by --out is replaced. A PNG that segattn wrote, found
/// in an input directory where this run would write it again, is an earlier
/// run's output, not a photo.
pub fn plan(args: &BatchArgs, extras: &[ExtraOutput]) -> Result<Plan> {
    let mut rejected = Vec::new();
    // (source, output stem relative to the output directory, shard key, listed)
    let mut sources: Vec<(Source, PathBuf, Vec<u8>, bool)> = Vec::new();
    for input in &args.inputs {
        let source = Source::from_arg(input);
        match &source {
            Source::Stdin if args.shard.is_some() => bail!("--shard splits files and directories, not standard input"),
            Source::Stdin => sources.push((source, PathBuf::from("stdin"), Vec::new(), false)),
            Source::File(path) if path.is_dir() => {
                let mut found = Listing::default();
                let listed = list_dir(path, args.recursive, &mut found, path, &mut HashSet::new());
                rejected.extend(found.not_files.iter().map(|p| Rejected {
                    name: p.display().to_string(),
                    reason: "not a regular file (a FIFO, a device or a socket); skipped".into(),
                }));
                match listed {
                    Ok(()) if found.photos.is_empty() && found.not_files.is_empty() => {
                        let below = if args.recursive { " or below it" } else { " (--recursive looks below it)" };
                        let reason = format!("no photos ({}) in this directory{below}", IMAGE_EXTENSIONS.join(", "));
                        rejected.push(Rejected { name: path.display().to_string(), reason })
                    }
                    Ok(()) => sources.extend(found.photos.into_iter().map(|(p, rel)| {
                        let key = rel.as_os_str().as_bytes().to_vec();
                        (Source::File(p), rel.with_extension(""), key, true)
                    })),
                    Err(err) => rejected.push(Rejected { name: path.display().to_string(), reason: err.to_string() }),
                }
            }
            Source::File(path) if !path.exists() => {
                if args.shard.is_none_or(|s| s.holds(path.as_os_str().as_bytes())) {
                    rejected.push(Rejected { name: path.display().to_string(), reason: "no such file".into() })
                }
            }
            Source::File(path) => {
                let stem = path.file_stem().map(PathBuf::from).unwrap_or_else(|| PathBuf::from("image"));
                let key = path.as_os_str().as_bytes().to_vec();
                sources.push((source.clone(), stem, key, false));
            }
        }
    }
    if sources.iter().filter(|(s, ..)| *s == Source::Stdin).count() > 1 {
        bail!("standard input (-) can be read only once");
    }

    let existing = if args.out.is_some() {
        Existing::Replace
    } else if args.overwrite {
        Existing::ReplaceFiles
    } else if args.skip_existing {
        Existing::Skip
    } else {
        Existing::Keep
    };
    let job = |source, out, extra| Job { source, out, extra, kept: Vec::new(), existing };
    let candidates: Vec<Candidate> = match (&args.out, &args.out_dir) {
        (Some(out), None) => {
            let single_file = args.inputs.len() == 1 && !args.inputs[0].is_dir();
            if !single_file {
                bail!("--out names one file, for one input; use --out-dir DIR for several inputs or a directory");
            }
            sources
                .into_iter()
                .map(|(source, _, shard_key, listed)| Candidate {
                    job: job(
                        source,
                        Sink::from_arg(out),
                        extras.iter().map(|e| (e.kind, e.path.to_path_buf())).collect(),
                    ),
                    shard_key,
                    listed,
                })
                .collect()
        }
        (None, Some(dir)) => {
            if sources.iter().any(|(s, ..)| *s == Source::Stdin) {
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
                .map(|(source, stem, shard_key, listed)| Candidate {
                    job: job(
                        source,
                        Sink::File(name(dir, &stem)),
                        extras.iter().map(|e| (e.kind, name(e.path, &stem))).collect(),
                    ),
                    shard_key,
                    listed,
                })
                .collect()
        }
        _ => bail!("give --out FILE (one input) or --out-dir DIR"),
    };
    let candidates = without_earlier_outputs(candidates);
    let inputs: HashSet<PathBuf> = candidates
        .iter()
        .filter_map(|c| match &c.job.source {
            Source::File(p) => comparable(p),
            Source::Stdin => None,
        })
        .collect();
    let all_shards = args.shard.map(|_| candidates.len());
    let jobs: Vec<Job> =
        candidates.into_iter().filter(|c| args.shard.is_none_or(|s| s.holds(&c.shard_key))).map(|c| c.job).collect();
    let (jobs, skipped) = check_outputs(jobs, &inputs, args.skip_existing, &mut rejected)?;
    Ok(Plan { jobs, rejected, skipped, all_shards })
}

/// Drops photos found in input directories that are segattn's own outputs
/// of another input of this run, left there by an earlier run.
fn without_earlier_outputs(candidates: Vec<Candidate>) -> Vec<Candidate> {
    let mut written_by: HashMap<PathBuf, usize> = HashMap::new();
    for (i, c) in candidates.iter().enumerate() {
        for output in c.job.output_files() {
            written_by.extend(comparable(output).map(|key| (key, i)));
        }
    }
    candidates
        .into_iter()
        .enumerate()
        .filter(|(i, c)| {
            let Source::File(path) = &c.job.source else {
                return true;
            };
            let earlier_output = c.listed
                && comparable(path).and_then(|key| written_by.get(&key)).is_some_and(|writer| writer != i)
                && image_io::is_segattn_output(path);
            !earlier_output
        })
        .map(|(_, c)| c)
        .collect()
}

/// Drops jobs whose output would overwrite another job's output, or lie
/// inside it, or an existing file, recording why; with `skip_existing`,
/// existing outputs are kept and jobs with nothing left to write are
/// skipped. Writing over an input is a usage error. Only then are the kept
/// jobs' output directories made (and temporary files that killed runs left
/// there removed): a job that is refused makes none.
fn check_outputs(
    jobs: Vec<Job>,
    inputs: &HashSet<PathBuf>,
    skip_existing: bool,
    rejected: &mut Vec<Rejected>,
) -> Result<(Vec<Job>, Vec<String>)> {
    let mut claimed: HashMap<PathBuf, String> = HashMap::new();
    // Every directory that holds a claimed output, and whose it is.
    let mut claimed_dirs: HashMap<PathBuf, String> = HashMap::new();
    let mut unclaimed = Vec::with_capacity(jobs.len());
    for job in jobs {
        let name = job.source.display_name();
        let keys: Vec<(&Path, PathBuf)> =
            job.output_files().filter_map(|output| Some((output, comparable(output)?))).collect();
        if let Some((output, _)) = keys.iter().find(|(_, key)| inputs.contains(key)) {
            bail!("refusing to write {} over an input", output.display());
        }
        let conflict = keys.iter().enumerate().find_map(|(i, (output, key))| {
            let shown = output.display();
            // This photo's other outputs count as claimed too.
            let (earlier, _) = keys.split_at(i);
            if let Some((other, _)) = earlier.iter().find(|(_, k)| k == key) {
                return Some(format!("output {shown} is the same file as its output {}", other.display()));
            }
            if let Some(other) = claimed.get(key) {
                return Some(format!("output {shown} is already written for {other}"));
            }
            if let Some(other) = claimed_dirs.get(key) {
                return Some(format!("output {shown} is a directory of the outputs for {other}"));
            }
            let (dir, other) = key.ancestors().skip(1).find_map(|dir| Some((dir, claimed.get(dir)?)))?;
            Some(format!("output {shown} would be inside {}, the output for {other}", dir.display()))
        });
        if let Some(reason) = conflict {
            rejected.push(Rejected { name, reason });
            continue;
        }
        for (_, key) in keys {
            for dir in key.ancestors().skip(1) {
                claimed_dirs.entry(dir.to_path_buf()).or_insert_with(|| name.clone());
            }
            claimed.insert(key, name.clone());
        }
        unclaimed.push(job);
    }

    let mut ready_dirs: HashSet<PathBuf> = HashSet::new();
    let mut kept = Vec::with_capacity(unclaimed.len());
    let mut skipped = Vec::new();
    'jobs: for mut job in unclaimed {
        let name = job.source.display_name();
        let mut existing_outputs = Vec::new();
        for output in job.output_files() {
            if let Some(dir) = output.parent().filter(|d| !d.as_os_str().is_empty())
                && !ready_dirs.contains(dir)
            {
                if let Err(err) = std::fs::create_dir_all(dir) {
                    rejected.push(Rejected { name, reason: format!("cannot create {}: {err}", dir.display()) });
                    continue 'jobs;
                }
                output::remove_stale_temp_files(dir);
                ready_dirs.insert(dir.to_path_buf());
            }
            // A link to nothing is there too: it is not a free name.
            if std::fs::symlink_metadata(output).is_ok() {
                existing_outputs.push(output.to_path_buf());
            }
        }
        if skip_existing {
            if job.out != Sink::Stdout && existing_outputs.len() == job.output_files().count() {
                skipped.push(name);
                continue;
            }
            job.kept = existing_outputs;
        } else if let Some(there) = existing_outputs.first().filter(|_| job.existing == Existing::Keep) {
            let reason =
                format!("{} already exists: --skip-existing keeps it, --overwrite replaces it", there.display());
            rejected.push(Rejected { name, reason });
            continue;
        }
        kept.push(job);
    }
    Ok((kept, skipped))
}

/// Fails when `output` is one of `inputs`, by whatever path: a command never
/// writes over a file it reads, its model and head included.
pub fn refuse_overwrite<'a>(output: &Path, inputs: impl IntoIterator<Item = &'a Path>) -> Result<()> {
    refuse_to_write_over([output], inputs)
}

/// Fails when one of `outputs` is one of `inputs`. Each input is resolved
/// once, however many outputs there are.
pub fn refuse_to_write_over<'a, 'b>(
    outputs: impl IntoIterator<Item = &'a Path>,
    inputs: impl IntoIterator<Item = &'b Path>,
) -> Result<()> {
    let inputs: Vec<(&Path, PathBuf)> = inputs
        .into_iter()
        .filter(|input| input.is_file())
        .filter_map(|input| Some((input, comparable(input)?)))
        .collect();
    if inputs.is_empty() {
        return Ok(());
    }
    for output in outputs {
        let Some(target) = comparable(output) else {
            continue;
        };
        if let Some((input, _)) = inputs.iter().find(|(_, key)| *key == target) {
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

/// Image files of `dir` by stem. Two files of one stem (`cat.jpg` and
/// `cat.png`) are an error: picking one would silently drop the other.
pub fn by_stem(dir: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let mut found = Listing::default();
    list_dir(dir, false, &mut found, dir, &mut HashSet::new())
        .with_context(|| format!("{}: cannot list directory", dir.display()))?;
    let mut by_stem = BTreeMap::new();
    for (path, _) in found.photos {
        let Some(stem) = path.file_stem().map(|s| s.to_string_lossy().into_owned()) else {
            continue;
        };
        if let Some(other) = by_stem.insert(stem.clone(), path.clone()) {
            bail!(
                "{} and {} share the stem {stem}: keep one of them in {}",
                other.display(),
                path.display(),
                dir.display()
            );
        }
    }
    Ok(by_stem)
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
