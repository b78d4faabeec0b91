//! The command line: argument definitions and dispatch. Each command lives in
//! its own module; `jobs` turns inputs into work items, `batch` runs them.

/// `println!` for a command's report on standard output: a stream that is
/// closed or full is an error ([`StdoutFailed`]: exit 1), never a panic.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::print_stdout(&format!("{}\n", format_args!($($arg)*)))
    };
}

mod attn_map;
mod batch;
mod eval;
mod fetch;
mod info;
mod jobs;
mod output;
mod run;
mod serve;
mod train_head;
mod values;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use image::DynamicImage;

use crate::head::{self, AttentionMass, DecoderHead, HeadMap, LinearHead, NormalizedCut, SegmentationHead};
use crate::hub::Hub;
use crate::image_io::{DEFAULT_MAX_PIXELS, Decoding};
use crate::maps::PixelMap;
use crate::model::{PanelCache, Precision, Vit, builtin, precision_unavailable_because};
use crate::preprocess;

/// Exit codes: every input done; some inputs failed; usage or model error.
pub const EXIT_OK: u8 = 0;
pub const EXIT_SOME_FAILED: u8 = 1;
pub const EXIT_USAGE: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "segattn",
    version,
    about = "Find the main object in a photo with a vision transformer, and show where it looks."
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Segment the main object: one mask PNG per input, at the input's size.
    Run(run::RunArgs),
    /// Heat map of the class token's self-attention over the photo.
    AttnMap(attn_map::AttnMapArgs),
    /// Score a head against ground-truth masks: mean IoU, max F-measure, MAE.
    Eval(eval::EvalArgs),
    /// Train the linear head on your photos and masks.
    TrainHead(train_head::TrainHeadArgs),
    /// Show the model's inferred configuration.
    Info(info::InfoArgs),
    /// Download published checkpoints into the Hugging Face cache.
    Fetch(fetch::FetchArgs),
    /// Show the model names, which are cached, and the default.
    List(fetch::ListArgs),
    /// Serve the model over HTTP: an API for programs and a page at / for people.
    Serve(serve::ServeArgs),
    /// Print a shell completion script (bash, zsh, fish, powershell, elvish).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff): segattn man > segattn.1
    Man,
}

#[derive(Debug, Args)]
struct ModelArgs {
    /// Checkpoint: a .safetensors or pytorch_model.bin file, or a Hugging Face
    /// snapshot directory (model.safetensors + config.json).
    #[arg(long, env = "SEGATTN_WEIGHTS", value_name = "PATH")]
    weights: Option<PathBuf>,
    /// segattn-s16 (built in), or a fetched model by name (see `segattn list`),
    /// read from the Hugging Face cache without network [default: segattn-s16].
    #[arg(long, env = "SEGATTN_MODEL", value_name = "NAME")]
    model: Option<String>,
    /// Short side of the image fed to the model, in pixels, rounded to whole
    /// patches [default: the model's own (224 for segattn-s16), else 480].
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = values::short_side)]
    size: Option<usize>,
    /// Never use the network: a --model that is not in the Hugging Face
    /// cache is an error (as with HF_HUB_OFFLINE=1) instead of a download.
    #[arg(long)]
    offline: bool,
    /// What the encoder's products multiply in: bf16 (bfloat16, summed in
    /// f32) takes about 0.6x the time on CPUs whose AVX512-BF16 outruns
    /// their f32 FMAs (AMD Zen 4), and elsewhere falls back to f32 with a
    /// warning.
    #[arg(long, env = "SEGATTN_PRECISION", value_enum, default_value_t = PrecisionName::F32)]
    precision: PrecisionName,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PrecisionName {
    F32,
    Bf16,
}

impl ModelArgs {
    fn load(&self) -> Result<Vit> {
        let precision = match self.precision {
            PrecisionName::F32 => Precision::F32,
            PrecisionName::Bf16 => Precision::Bf16,
        };
        let model = self.load_in(precision)?;
        // A broken setting for any head is a broken checkpoint, whichever head runs.
        head::check_bundled_settings(&model)?;
        if model.precision() != precision {
            let why = precision_unavailable_because(precision).unwrap_or("its kernels multiply in f32");
            note!("segattn: warning: --precision bf16 runs in f32 here: {why}");
        }
        Ok(model)
    }

    fn load_in(&self, precision: Precision) -> Result<Vit> {
        let path = match (&self.weights, self.model.as_deref()) {
            (Some(_), Some(_)) => {
                bail!("give --weights or --model, not both (SEGATTN_WEIGHTS and SEGATTN_MODEL count as given)")
            }
            (Some(path), None) => path.clone(),
            (None, None) => return Vit::builtin_in(precision),
            (None, Some(name)) if name == builtin::NAME => return Vit::builtin_in(precision),
            (None, Some(name)) => {
                let mut hub = Hub::from_env();
                hub.offline |= self.offline;
                hub.resolve(name, std::io::stderr().is_terminal())?
            }
        };
        Vit::load_cached(&path, precision, PanelCache::from_env().as_ref())
    }

    /// The files a loaded model was read from, which no output may replace.
    fn files_of(model: &Vit) -> Vec<&std::path::Path> {
        model.files().on_disk()
    }

    /// The input's short side: `--size`, else what the model was trained
    /// for, else the resolution of the DINO paper's attention figures.
    fn short_side(&self, model: &Vit) -> usize {
        self.size.or(model.default_short_side()).unwrap_or(preprocess::DEFAULT_SHORT_SIDE)
    }
}

#[derive(Debug, Args)]
struct BatchArgs {
    /// Image files, directories, or - for standard input.
    #[arg(required = true, value_name = "INPUT")]
    inputs: Vec<PathBuf>,
    /// Output file for a single input (- for standard output).
    #[arg(long, value_name = "FILE", conflicts_with = "out_dir")]
    out: Option<PathBuf>,
    /// Output directory: one {stem}{suffix}.png per input.
    #[arg(long, value_name = "DIR")]
    out_dir: Option<PathBuf>,
    /// Appended to each output's stem in --out-dir, e.g. _mask.
    #[arg(long, default_value = "", value_parser = values::suffix)]
    suffix: String,
    /// Descend into subdirectories of directory inputs.
    #[arg(long, short = 'r')]
    recursive: bool,
    #[command(flatten)]
    work: WorkArgs,
    /// One JSON line per image on standard output.
    #[arg(long)]
    json: bool,
    /// Also append each image's JSON line (results, errors and skips) to
    /// this file, e.g. one report per shard.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    /// Leave outputs that already exist as they are, and skip photos whose
    /// outputs all exist: an interrupted run picks up where it stopped.
    #[arg(long, conflicts_with = "overwrite")]
    skip_existing: bool,
    /// Replace outputs in --out-dir that already exist. Without it (or
    /// --skip-existing) such a photo fails and the file is kept.
    #[arg(long)]
    overwrite: bool,
    /// Only part K of N of the photos (K from 0 to N-1), chosen by a hash of
    /// each photo's path below its input directory: N runs with K = 0..N-1,
    /// on one machine or many, cover every photo once.
    #[arg(long, value_name = "K/N", env = "SEGATTN_SHARD", value_parser = values::shard)]
    shard: Option<values::Shard>,
    /// Decode damaged JPEGs as far as they go (grey below the damage)
    /// instead of failing them.
    #[arg(long)]
    lenient: bool,
}

impl BatchArgs {
    fn decoding(&self) -> Decoding {
        Decoding { max_pixels: self.work.max_pixels, lenient: self.lenient }
    }
}

/// How many photos are worked on at once, and how large they may be
/// (every command that reads photos).
#[derive(Debug, Args)]
struct WorkArgs {
    /// Images processed in parallel (default: all cores; at most twice the cores).
    #[arg(long, short = 'j', value_name = "N", allow_negative_numbers = true, value_parser = values::at_least_one)]
    jobs: Option<usize>,
    /// Refuse images with more pixels than this.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_PIXELS)]
    max_pixels: u64,
}

/// Photos and their masks, matched by file stem (eval and train-head).
#[derive(Debug, Args)]
struct PairArgs {
    /// Directory of photos.
    #[arg(long, value_name = "DIR")]
    images: PathBuf,
    /// Directory of masks (white = object), matched to photos by file stem.
    #[arg(long, value_name = "DIR")]
    masks: PathBuf,
}

impl PairArgs {
    fn pair(&self) -> Result<(Vec<jobs::Pair>, Vec<String>)> {
        jobs::pair_by_stem(&self.images, &self.masks)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum HeadName {
    /// DINO's attention mass: the patches holding --mass of each head's attention.
    Attn,
    /// TokenCut: a normalized cut of the last layer's key similarities.
    Ncut,
    /// A trained classifier on the patch tokens (head.weight / head.bias).
    Linear,
    /// A trained decoder on the patch tokens and the stem's features (decoder.*).
    Decoder,
}

impl std::fmt::Display for HeadName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let value = self.to_possible_value().expect("every head has a name");
        f.write_str(value.get_name())
    }
}

/// How a foreground map is made and thresholded (run and eval).
#[derive(Debug, Args)]
struct HeadArgs {
    /// Segmentation head [default: the model's own trained head when it
    /// carries one (decoder for segattn-s16; linear with --head-weights), else attn].
    #[arg(long, value_enum)]
    head: Option<HeadName>,
    /// Foreground where the head's probability is at least this.
    #[arg(long, default_value_t = 0.5, allow_negative_numbers = true, value_parser = values::unit_interval)]
    threshold: f32,
    /// attn head: share of each attention head's mass kept [default: 0.6].
    #[arg(long, allow_negative_numbers = true, value_parser = values::above_zero_to_one::<f32>)]
    mass: Option<f32>,
    /// attn head: attention heads that must agree on a patch (default: half).
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = values::at_least_one)]
    min_heads: Option<usize>,
    /// ncut head: key similarity above which two patches are linked [default:
    /// the model's own (0.9 for segattn-s16), else TokenCut's 0.2].
    #[arg(long, allow_negative_numbers = true, value_parser = values::zero_to_below_one)]
    tau: Option<f64>,
    /// linear head: safetensors file with head.weight / head.bias (default: the model's own).
    #[arg(long, value_name = "FILE")]
    head_weights: Option<PathBuf>,
    /// Make mask edges follow the photo's edges (guided filter) instead of the patch grid.
    #[arg(long)]
    refine: bool,
}

impl HeadArgs {
    fn build(&self, model: &Vit) -> Result<Box<dyn SegmentationHead>> {
        let heads = model.config().num_heads;
        if let Some(n) = self.min_heads.filter(|&n| n > heads) {
            bail!("--min-heads must be between 1 and {heads} for this model, got {n}");
        }
        let name = self.name(model);
        if self.head_weights.is_some() && name != HeadName::Linear {
            bail!("--head-weights is a linear head's file: it does not go with --head {name}");
        }
        // An option of another head would be accepted and do nothing.
        if (self.mass.is_some() || self.min_heads.is_some()) && name != HeadName::Attn {
            bail!("--mass and --min-heads tune the attn head: they do not go with --head {name}");
        }
        if self.tau.is_some() && name != HeadName::Ncut {
            bail!("--tau tunes the ncut head: it does not go with --head {name}");
        }
        Ok(match name {
            HeadName::Attn => Box::new(AttentionMass::new(self.mass.unwrap_or(0.6), self.min_heads)?),
            HeadName::Ncut => Box::new(match self.tau {
                Some(tau) => NormalizedCut { tau },
                None => NormalizedCut::for_model(model)?,
            }),
            HeadName::Decoder => Box::new(DecoderHead::bundled(model)?.with_context(|| {
                format!("{}: no trained decoder (decoder.*) in the model", model.files().weights.display())
            })?),
            HeadName::Linear => match &self.head_weights {
                Some(path) => Box::new(LinearHead::load(path, model)?),
                None => Box::new(LinearHead::bundled(model)?.with_context(|| {
                    format!(
                        "{}: no trained head (head.weight, head.bias) in the model; give --head-weights FILE",
                        model.files().weights.display()
                    )
                })?),
            },
        })
    }

    /// The head asked for, or the model's own when it carries one.
    fn name(&self, model: &Vit) -> HeadName {
        self.head.unwrap_or(if self.head_weights.is_some() {
            HeadName::Linear
        } else if head::has_bundled_decoder(model) {
            HeadName::Decoder
        } else if head::has_bundled_linear(model) {
            HeadName::Linear
        } else {
            HeadName::Attn
        })
    }

    /// Foreground probability per pixel of `photo`, from the head's `map` of it.
    fn pixel_map(&self, model: &Vit, map: &HeadMap, photo: &DynamicImage, size: usize) -> PixelMap {
        let map = map.to_pixels(photo.width(), photo.height());
        if self.refine { head::refine_to_photo(model, &map, photo, size) } else { map }
    }
}

/// On SIGINT, SIGTERM or SIGHUP: removes the temporary files of outputs
/// being written, and exits as a shell reports a death by that signal
/// (128 + its number: 130 for Ctrl-C).
fn remove_temporary_outputs_on_signals() {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) else {
        return;
    };
    std::thread::spawn(move || {
        if let Some(signal) = signals.forever().next() {
            output::abandon_pending_outputs_and_exit(128 + signal);
        }
    });
}

fn print_completions(shell: clap_complete::Shell) -> Result<u8> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut <Cli as clap::CommandFactory>::command(), "segattn", &mut script);
    output::write_stdout(&script).context(StdoutFailed)?;
    Ok(EXIT_OK)
}

fn print_man_page() -> Result<u8> {
    let mut page = Vec::new();
    clap_mangen::Man::new(<Cli as clap::CommandFactory>::command()).render(&mut page)?;
    output::write_stdout(&page).context(StdoutFailed)?;
    Ok(EXIT_OK)
}

/// A command's report could not be written to standard output.
#[derive(Debug)]
struct StdoutFailed;

impl std::fmt::Display for StdoutFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("cannot write the report")
    }
}

fn print_stdout(text: &str) -> Result<()> {
    output::write_stdout(text.as_bytes()).context(StdoutFailed)
}

/// What `segattn run ARGS` would write, planned as a run plans it and with
/// the output folders made as it starts (nothing else touched), without
/// loading a model: each job's photo (`None` for standard input) and output
/// files. For the fuzz target that checks the planner's rules against real
/// directories.
#[cfg(fuzzing)]
pub fn plan_run(args: &[std::ffi::OsString]) -> Result<Vec<(Option<PathBuf>, Vec<PathBuf>)>> {
    let argv = ["segattn".into(), "run".into()].into_iter().chain(args.iter().cloned());
    let Command::Run(args) = Cli::try_parse_from(argv)?.command else {
        bail!("not a run");
    };
    let plan = run::plan(&args)?.make_output_dirs();
    let source = |job: &jobs::Job| match &job.source {
        crate::image_io::Source::File(path) => Some(path.clone()),
        crate::image_io::Source::Stdin => None,
    };
    Ok(plan
        .jobs
        .iter()
        .map(|job| (source(job), job.output_files().map(std::path::Path::to_path_buf).collect()))
        .collect())
}

/// Parses the arguments, runs the command, and returns the exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // Past a file-size limit (ulimit -f) a write fails with EFBIG, which is
    // that output's error, instead of the signal killing the whole batch.
    // SAFETY: ignoring a signal has no preconditions; nothing else here
    // handles SIGXFSZ.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    // A server ends on a signal by answering what it has read; every other
    // command removes its temporary outputs and exits.
    if !matches!(cli.command, Command::Serve(_)) {
        remove_temporary_outputs_on_signals();
    }
    let code = match cli.command {
        Command::Run(args) => run::run(args),
        Command::AttnMap(args) => attn_map::run(args),
        Command::Eval(args) => eval::run(args),
        Command::TrainHead(args) => train_head::run(args),
        Command::Info(args) => info::run(args),
        Command::Fetch(args) => fetch::fetch(args),
        Command::List(args) => fetch::list(args),
        Command::Serve(args) => serve::run(args),
        Command::Completions { shell } => print_completions(shell),
        Command::Man => print_man_page(),
    };
    ExitCode::from(code.unwrap_or_else(|err| {
        note!("segattn: {}", batch::one_line(&err));
        if err.downcast_ref::<StdoutFailed>().is_some() { EXIT_SOME_FAILED } else { EXIT_USAGE }
    }))
}
