//! The command line: argument definitions and dispatch. Each command lives in
//! its own module; `jobs` turns inputs into work items, `batch` runs them.

mod attn_map;
mod batch;
mod info;
mod jobs;
mod run;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use candle_core::Device;
use clap::{Args, Parser, Subcommand};

use crate::image_io::DEFAULT_MAX_PIXELS;
use crate::model::Vit;

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
    /// Show the model's inferred configuration.
    Info(info::InfoArgs),
}

#[derive(Debug, Args)]
struct ModelArgs {
    /// Checkpoint: a .safetensors file or a Hugging Face snapshot directory
    /// (model.safetensors + config.json).
    #[arg(long, env = "SEGATTN_WEIGHTS", value_name = "PATH")]
    weights: Option<PathBuf>,
    /// Short side of the image fed to the model, in pixels (rounded to whole patches).
    #[arg(long, value_name = "N", default_value_t = crate::preprocess::DEFAULT_SHORT_SIDE)]
    size: usize,
}

impl ModelArgs {
    fn load(&self) -> Result<Vit> {
        let path = self.weights.as_ref().context(
            "no model given: pass --weights PATH (a DINO / DINOv2 .safetensors file or Hugging Face \
             snapshot directory) or set SEGATTN_WEIGHTS",
        )?;
        Vit::load(path, &Device::Cpu)
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
    #[arg(long, default_value = "")]
    suffix: String,
    /// Descend into subdirectories of directory inputs.
    #[arg(long, short = 'r')]
    recursive: bool,
    /// Images processed in parallel (default: all cores).
    #[arg(long, short = 'j', value_name = "N")]
    jobs: Option<usize>,
    /// Refuse images with more pixels than this.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_PIXELS)]
    max_pixels: u64,
    /// One JSON line per image on standard output.
    #[arg(long)]
    json: bool,
}

/// Parses the arguments, runs the command, and returns the exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Run(args) => run::run(args),
        Command::AttnMap(args) => attn_map::run(args),
        Command::Info(args) => info::run(args),
    };
    ExitCode::from(code.unwrap_or_else(|err| {
        eprintln!("segattn: {}", batch::one_line(&err));
        EXIT_USAGE
    }))
}
