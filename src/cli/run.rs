//! `segattn run`: masks, overlays and cut-outs.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Result, bail};
use clap::Args;
use image::DynamicImage;
use serde_json::json;

use super::jobs::{Extra, ExtraOutput, Job};
use super::output::{Committed, Sink};
use super::{BatchArgs, HeadArgs, ModelArgs, batch, jobs};
use crate::head::{self, SegmentationHead};
use crate::image_io;
use crate::model::Vit;
use crate::{preprocess, render};

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    batch: BatchArgs,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    head: HeadArgs,
    /// Write the probability (0..255) instead of a 0/255 mask.
    #[arg(long)]
    soft: bool,
    /// Also write the photo with the mask tinted and outlined (a directory with --out-dir).
    #[arg(long, value_name = "PATH")]
    overlay: Option<PathBuf>,
    /// Also write an RGBA cut-out with a transparent background (a directory with --out-dir).
    #[arg(long, value_name = "PATH")]
    cutout: Option<PathBuf>,
}

/// The photos and outputs of this run, before any model is loaded.
pub fn plan(args: &RunArgs) -> Result<jobs::Plan> {
    if args.batch.json && args.batch.out.as_deref() == Some(Path::new("-")) {
        bail!("--json and --out - both write to standard output; choose one");
    }
    let extras: Vec<ExtraOutput> = [(Extra::Overlay, &args.overlay), (Extra::Cutout, &args.cutout)]
        .into_iter()
        .filter_map(|(kind, path)| Some(ExtraOutput { kind, path: path.as_deref()? }))
        .collect();
    jobs::plan(&args.batch, &extras)
}

pub fn run(args: RunArgs) -> Result<u8> {
    let plan = plan(&args)?;
    let model = args.model.load()?;
    let model_files = ModelArgs::files_of(&model);
    jobs::refuse_to_write_over(
        plan.jobs.iter().flat_map(Job::output_files),
        model_files.iter().copied().chain(args.head.head_weights.as_deref()),
    )?;
    let head = args.head.build(&model)?;
    batch::run(plan, &args.batch, &model_files, |job| segment_one(&model, head.as_ref(), &args, job))
}

fn segment_one(model: &Vit, head: &dyn SegmentationHead, args: &RunArgs, job: &Job) -> Result<serde_json::Value> {
    let start = Instant::now();
    let photo = image_io::read_image(&job.source, args.batch.decoding())?;
    let (width, height) = (photo.width(), photo.height());
    let size = args.model.short_side(model);
    let soft = args.head.pixel_map(model, &head::segment(model, head, &photo, size)?, &photo, size);
    let binary = render::mask(&soft, args.head.threshold, false);
    let written = if args.soft { render::mask(&soft, args.head.threshold, true) } else { binary.clone() };
    let mut writer = job.writer();
    writer.png(&DynamicImage::ImageLuma8(written.clone()), &job.out)?;

    let mut outputs = serde_json::Map::new();
    outputs.insert("mask".into(), json!(job.out.display_name()));
    if !job.extra.is_empty() {
        let rgb = preprocess::to_rgb(&photo);
        for (kind, path) in &job.extra {
            let picture = match kind {
                Extra::Overlay => DynamicImage::ImageRgb8(render::overlay(&rgb, &binary)),
                Extra::Cutout => DynamicImage::ImageRgba8(render::cutout(&rgb, &written)),
            };
            writer.png(&picture, &Sink::File(path.clone()))?;
            outputs.insert(kind.name().into(), json!(path.display().to_string()));
        }
    }
    if writer.commit()? == Committed::FoundWritten {
        return Ok(json!({ "input": job.source.display_name(), "skipped": "written meanwhile by another run" }));
    }
    let (area, bbox) = render::mask_stats(&binary);
    Ok(json!({
        "input": job.source.display_name(),
        "outputs": outputs,
        "width": width,
        "height": height,
        "mask_area": area,
        "bbox": bbox,
        "ms": start.elapsed().as_secs_f64() * 1000.0,
    }))
}
