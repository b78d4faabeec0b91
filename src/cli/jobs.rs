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

/// An input, found on the command line or in a directory.
struct Found {
    source: Source,
    /// Its outputs' names below the output directory, without the suffix
    /// and extension.
    stem: PathBuf,
    /// What --shard hashes: the path below the input directory, or the
    /// argument as given.
    shard_key: Vec<u8>,
    /// Found in a directory rather than named on the command line.
    listed: bool,
}

/// An input with its outputs named, before they are checked.
struct Candidate {
    job: Job,
    /// The photo's [`comparable`] path, where it is a file that has one.
    source_key: Option<PathBuf>,
    /// Each output's [`comparable`] path, where it has one.
    output_keys: Vec<(PathBuf, PathBuf)>,
    shard_key: Vec<u8>,
    listed: bool,
}

impl Candidate {
    /// `found`, its outputs `out` and `extra` named.
    fn new(found: Found, out: Sink, extra: Vec<(Extra, PathBuf)>, existing: Existing) -> Self {
        let job = Job { source: found.source, out, extra, kept: Vec::new(), existing };
        let source_key = match &job.source {
            Source::File(path) => comparable(path),
            Source::Stdin => None,
        };
        let output_keys = job.output_files().filter_map(|o| Some((o.to_path_buf(), comparable(o)?))).collect();
        Self { job, source_key, output_keys, shard_key: found.shard_key, listed: found.listed }
    }
}

/// Expands `args.inputs` into jobs, reading the file system but changing
/// nothing in it ([`Plan::make_output_dirs`] does, when the run starts).
/// Usage mistakes are errors; inputs that cannot be used are returned as
/// rejections so the batch can go on.
///
/// The rules for outputs: none may replace an input (that is an error);
/// two inputs may not share one; an existing file in --out-dir is kept
/// (the input fails) unless --overwrite or --skip-existing says otherwise,
/// while a file named by --out is replaced. A PNG that segattn wrote, found
/// in an input directory where this run would write it again, is an earlier
/// run's output, not a photo.
pub fn plan(args: &BatchArgs, extras: &[ExtraOutput]) -> Result<Plan> {
    let (found, mut rejected) = find_inputs(args)?;
    let existing = if args.out.is_some() {
        Existing::Replace
    } else if args.overwrite {
        Existing::ReplaceFiles
    } else if args.skip_existing {
        Existing::Skip
    } else {
        Existing::Keep
    };
    let candidates = name_outputs(found, args, extras, existing)?;
    let candidates = without_earlier_outputs(candidates);
    let inputs: HashSet<PathBuf> = candidates.iter().filter_map(|c| c.source_key.clone()).collect();
    let all_shards = args.shard.map(|_| candidates.len());
    let candidates = candidates.into_iter().filter(|c| args.shard.is_none_or(|s| s.holds(&c.shard_key)));
    let (unclaimed, refused) = claim_outputs(candidates, &inputs)?;
    rejected.extend(refused);
    let mut jobs = Vec::with_capacity(unclaimed.len());
    let mut skipped = Vec::new();
    for mut job in unclaimed {
        // A link to nothing is there too: it is not a free name.
        let there: Vec<PathBuf> =
            job.output_files().filter(|o| std::fs::symlink_metadata(o).is_ok()).map(Path::to_path_buf).collect();
        if args.skip_existing {
            if job.out != Sink::Stdout && there.len() == job.output_files().count() {
                skipped.push(job.source.display_name());
                continue;
            }
            job.kept = there;
        } else if let Some(there) = there.first().filter(|_| job.existing == Existing::Keep) {
            let reason =
                format!("{} already exists: --skip-existing keeps it, --overwrite replaces it", there.display());
            rejected.push(Rejected { name: job.source.display_name(), reason });
            continue;
        }
        jobs.push(job);
    }
    Ok(Plan { jobs, rejected, skipped, all_shards })
}

/// The photos `args.inputs` name, directories listed, in order; and the
/// inputs that cannot be used, with why.
fn find_inputs(args: &BatchArgs) -> Result<(Vec<Found>, Vec<Rejected>)> {
    let mut rejected = Vec::new();
    let mut sources = Vec::new();
    for input in &args.inputs {
        let source = Source::from_arg(input);
        match &source {
            Source::Stdin if args.shard.is_some() => bail!("--shard splits files and directories, not standard input"),
            Source::Stdin => sources.push(Found { source, stem: "stdin".into(), shard_key: Vec::new(), listed: false }),
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
                    Ok(()) => sources.extend(found.photos.into_iter().map(|(path, relative)| Found {
                        source: Source::File(path),
                        stem: relative.with_extension(""),
                        shard_key: relative.as_os_str().as_bytes().to_vec(),
                        listed: true,
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
                let shard_key = path.as_os_str().as_bytes().to_vec();
                sources.push(Found { source: source.clone(), stem, shard_key, listed: false });
            }
        }
    }
    if sources.iter().filter(|f| f.source == Source::Stdin).count() > 1 {
        bail!("standard input (-) can be read only once");
    }
    Ok((sources, rejected))
}

/// Names each input's outputs: --out for one input, else a file in
/// --out-dir (and in each extra's directory) after its stem.
fn name_outputs(
    found: Vec<Found>,
    args: &BatchArgs,
    extras: &[ExtraOutput],
    existing: Existing,
) -> Result<Vec<Candidate>> {
    Ok(match (&args.out, &args.out_dir) {
        (Some(out), None) => {
            let single_file = args.inputs.len() == 1 && !args.inputs[0].is_dir();
            if !single_file {
                bail!("--out names one file, for one input; use --out-dir DIR for several inputs or a directory");
            }
            let extra = || extras.iter().map(|e| (e.kind, e.path.to_path_buf())).collect();
            found.into_iter().map(|f| Candidate::new(f, Sink::from_arg(out), extra(), existing)).collect()
        }
        (None, Some(dir)) => {
            if found.iter().any(|f| f.source == Source::Stdin) {
                bail!("standard input (-) needs --out FILE (or --out - for standard output)");
            }
            let name = |base: &Path, stem: &Path| {
                let mut file = stem.as_os_str().to_os_string();
                file.push(&args.suffix);
                file.push(".png");
                base.join(file)
            };
            found
                .into_iter()
                .map(|f| {
                    let extra = extras.iter().map(|e| (e.kind, name(e.path, &f.stem))).collect();
                    let out = Sink::File(name(dir, &f.stem));
                    Candidate::new(f, out, extra, existing)
                })
                .collect()
        }
        _ => bail!("give --out FILE (one input) or --out-dir DIR"),
    })
}

/// Drops photos found in input directories that are segattn's own outputs
/// of another input of this run, left there by an earlier run.
fn without_earlier_outputs(candidates: Vec<Candidate>) -> Vec<Candidate> {
    let mut written_by: HashMap<PathBuf, usize> = HashMap::new();
    for (i, c) in candidates.iter().enumerate() {
        written_by.extend(c.output_keys.iter().map(|(_, key)| (key.clone(), i)));
    }
    candidates
        .into_iter()
        .enumerate()
        .filter(|(i, c)| {
            let Source::File(path) = &c.job.source else {
                return true;
            };
            let earlier_output = c.listed
                && c.source_key.as_ref().and_then(|key| written_by.get(key)).is_some_and(|writer| writer != i)
                && image_io::is_segattn_output(path);
            !earlier_output
        })
        .map(|(_, c)| c)
        .collect()
}

/// Refuses jobs whose output would be another job's output, or lie inside
/// it, or be the folder of another's, returning the rest and the refused
/// with why. Writing over an input is a usage error.
fn claim_outputs(
    candidates: impl Iterator<Item = Candidate>,
    inputs: &HashSet<PathBuf>,
) -> Result<(Vec<Job>, Vec<Rejected>)> {
    let mut claimed: HashMap<PathBuf, String> = HashMap::new();
    // Every directory that holds a claimed output, and whose it is.
    let mut claimed_dirs: HashMap<PathBuf, String> = HashMap::new();
    let (mut unclaimed, mut rejected) = (Vec::new(), Vec::new());
    for Candidate { job, output_keys: keys, .. } in candidates {
        let name = job.source.display_name();
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
    Ok((unclaimed, rejected))
}

impl Plan {
    /// What the run does first: makes the jobs' output directories, each
    /// once, and removes there the temporary files that killed runs left.
    /// A job whose directory cannot be made is refused, and makes none.
    pub fn make_output_dirs(mut self) -> Self {
        let mut ready: HashSet<PathBuf> = HashSet::new();
        let jobs = std::mem::take(&mut self.jobs);
        for job in jobs {
            let dirs: Vec<PathBuf> = job
                .output_files()
                .filter_map(|output| output.parent().filter(|d| !d.as_os_str().is_empty()))
                .filter(|dir| !ready.contains(*dir))
                .map(Path::to_path_buf)
                .collect();
            let made = dirs.iter().try_for_each(|dir| {
                std::fs::create_dir_all(dir).map_err(|err| format!("cannot create {}: {err}", dir.display()))
            });
            match made {
                Ok(()) => {
                    for dir in dirs {
                        output::remove_stale_temp_files(&dir);
                        ready.insert(dir);
                    }
                    self.jobs.push(job);
                }
                Err(reason) => self.rejected.push(Rejected { name: job.source.display_name(), reason }),
            }
        }
        self
    }
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Line {
        #[command(flatten)]
        batch: BatchArgs,
    }

    /// The plan of `args` (after the program's name), with `dir` as the
    /// folder its relative paths start from.
    fn plan_in(dir: &Path, args: &[&str]) -> Result<Plan> {
        let args: Vec<String> = args
            .iter()
            .map(|a| if a.starts_with('-') { a.to_string() } else { dir.join(a).display().to_string() })
            .collect();
        let line = Line::try_parse_from(std::iter::once("segattn".to_string()).chain(args))?;
        plan(&line.batch, &[])
    }

    fn photos(dir: &Path, names: &[&str]) {
        for name in names {
            let path = dir.join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, b"not decoded while planning").unwrap();
        }
    }

    fn outputs(plan: &Plan, dir: &Path) -> Vec<String> {
        let relative = |p: &Path| p.strip_prefix(dir).unwrap().display().to_string();
        plan.jobs.iter().flat_map(Job::output_files).map(relative).collect()
    }

    #[test]
    fn outputs_are_named_after_the_photos_and_no_folder_is_made_while_planning() {
        let dir = tempfile::tempdir().unwrap();
        photos(dir.path(), &["in/a.jpg", "in/sub/b.png", "in/notes.txt"]);
        let plan = plan_in(dir.path(), &["in", "-r", "--out-dir", "out", "--suffix=_m"]).unwrap();
        assert_eq!(outputs(&plan, dir.path()), ["out/a_m.png", "out/sub/b_m.png"]);
        assert!(!dir.path().join("out").exists(), "planning made a folder");
        let plan = plan.make_output_dirs();
        assert_eq!(plan.jobs.len(), 2);
        assert!(dir.path().join("out/sub").is_dir());
    }

    #[test]
    fn an_output_over_an_input_is_an_error_and_a_shared_output_refuses_the_second_photo() {
        let dir = tempfile::tempdir().unwrap();
        photos(dir.path(), &["in/a.png", "in/b.jpg", "in/b.webp"]);
        let over = plan_in(dir.path(), &["in", "--out-dir", "in"]).err().unwrap();
        assert!(over.to_string().contains("over an input"), "{over}");
        let plan = plan_in(dir.path(), &["in", "--out-dir", "out"]).unwrap();
        assert_eq!(outputs(&plan, dir.path()), ["out/a.png", "out/b.png"]);
        assert_eq!(plan.rejected.len(), 1);
        assert!(plan.rejected[0].name.ends_with("b.webp"), "{}", plan.rejected[0].name);
        assert!(plan.rejected[0].reason.contains("already written for"), "{}", plan.rejected[0].reason);
    }

    #[test]
    fn an_existing_output_is_kept_skipped_or_replaced_as_asked() {
        let dir = tempfile::tempdir().unwrap();
        photos(dir.path(), &["in/a.jpg", "in/b.jpg", "out/a.png"]);
        let kept = plan_in(dir.path(), &["in", "--out-dir", "out"]).unwrap();
        assert_eq!(outputs(&kept, dir.path()), ["out/b.png"]);
        assert!(kept.rejected[0].reason.contains("already exists"), "{}", kept.rejected[0].reason);
        let skipped = plan_in(dir.path(), &["in", "--out-dir", "out", "--skip-existing"]).unwrap();
        assert_eq!((outputs(&skipped, dir.path()), skipped.skipped.len()), (vec!["out/b.png".to_string()], 1));
        let replaced = plan_in(dir.path(), &["in", "--out-dir", "out", "--overwrite"]).unwrap();
        assert_eq!(outputs(&replaced, dir.path()), ["out/a.png", "out/b.png"]);
        assert!(replaced.rejected.is_empty() && replaced.skipped.is_empty());
    }

    #[test]
    fn a_folder_that_cannot_be_made_refuses_its_jobs_only() {
        let dir = tempfile::tempdir().unwrap();
        photos(dir.path(), &["in/a.jpg", "in/sub/b.jpg", "blocked"]);
        // No folder can be made where a file stands.
        let plan = plan_in(dir.path(), &["in", "-r", "--out-dir", "blocked"]).unwrap();
        assert_eq!(plan.jobs.len(), 2);
        let plan = plan.make_output_dirs();
        assert!(plan.jobs.is_empty());
        assert_eq!(plan.rejected.len(), 2);
        assert!(plan.rejected[0].reason.starts_with("cannot create"), "{}", plan.rejected[0].reason);
        let plan = plan_in(dir.path(), &["in", "--out-dir", "out"]).unwrap().make_output_dirs();
        assert_eq!(outputs(&plan, dir.path()), ["out/a.png"]);
    }
}
