//! `segattn eval`: score a head, or another tool's masks, against ground truth.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use image::{DynamicImage, GrayImage};
use serde_json::json;

use super::jobs::{self, Pair};
use super::{EXIT_OK, EXIT_SOME_FAILED, HeadArgs, ModelArgs, PairArgs, WorkArgs, batch};
use crate::head::{self, SegmentationHead};
use crate::image_io::{self, Decoding, Source};
use crate::maps::PatchMap;
use crate::metrics::{self, ImageScores};
use crate::model::Vit;

#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pairs: PairArgs,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    head: HeadArgs,
    /// Score the soft masks in this directory (8-bit gray, 255 = object,
    /// matched by stem; from any tool) instead of running a model.
    #[arg(long, value_name = "DIR")]
    predictions: Option<PathBuf>,
    /// Also write the scores, with one row per image, as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    #[command(flatten)]
    work: WorkArgs,
}

/// What makes the soft map that is scored.
enum Scorer<'a> {
    Model { model: &'a Vit, head: &'a dyn SegmentationHead },
    Predictions(&'a Path),
}

/// One image's scores, and for a model the share of its last layer's
/// class-token attention that falls on the object.
struct Scored {
    scores: ImageScores,
    attention_inside: Option<f64>,
}

pub fn run(args: EvalArgs) -> Result<u8> {
    if let Some(dir) = &args.predictions {
        std::fs::read_dir(dir).with_context(|| format!("{}: cannot list directory", dir.display()))?;
    }
    // Checked before scoring, which can take minutes, not after.
    if let Some(report) = &args.json
        && let Some(parent) = report.parent().filter(|p| !p.as_os_str().is_empty() && !p.is_dir())
    {
        bail!("{}: no directory {} to write it in", report.display(), parent.display());
    }
    let (pairs, missing) = args.pairs.pair()?;
    for line in &missing {
        note!("segattn: {line}");
    }
    let loaded = match &args.predictions {
        Some(_) => None,
        None => {
            let model = args.model.load()?;
            let head = args.head.build(&model)?;
            Some((model, head))
        }
    };
    if let Some(report) = &args.json {
        let mut read: Vec<&Path> = pairs.iter().flat_map(|p| [p.image.as_path(), p.mask.as_path()]).collect();
        let predicted: Vec<PathBuf> = match &args.predictions {
            Some(dir) => pairs.iter().map(|p| dir.join(format!("{}.png", p.stem))).collect(),
            None => Vec::new(),
        };
        read.extend(predicted.iter().map(PathBuf::as_path));
        if let Some((model, _)) = &loaded {
            read.extend(ModelArgs::files_of(model));
        }
        read.extend(args.head.head_weights.as_deref());
        jobs::refuse_overwrite(report, read)?;
    }
    let scorer = match (&loaded, &args.predictions) {
        (Some((model, head)), _) => Scorer::Model { model, head: head.as_ref() },
        (None, Some(dir)) => Scorer::Predictions(dir),
        (None, None) => unreachable!("a model is loaded unless predictions are given"),
    };
    let results = batch::for_each(
        &pairs,
        |p| p.image.display().to_string(),
        args.work.jobs,
        |pair| score_pair(&scorer, &args, pair),
    )?;
    let unreadable: Vec<String> =
        pairs.iter().zip(&results).filter(|(_, r)| r.is_none()).map(|(p, _)| p.image.display().to_string()).collect();
    // Pairs come sorted by stem, and results in their order.
    let scored: Vec<(&Pair, Scored)> = pairs.iter().zip(results).filter_map(|(p, r)| Some((p, r?))).collect();
    if scored.is_empty() {
        // Means over nothing would print as scores of 0.
        note!("segattn: none of the {} images could be scored: no means, no report", pairs.len());
        return Ok(EXIT_SOME_FAILED);
    }
    let summary = metrics::summarize(&scored.iter().map(|(_, s)| s.scores.clone()).collect::<Vec<_>>());
    let inside: Vec<f64> = scored.iter().filter_map(|(_, s)| s.attention_inside).collect();
    let attention_inside = (!inside.is_empty()).then(|| inside.iter().sum::<f64>() / inside.len() as f64);
    outln!("images    {}", summary.images)?;
    outln!("mean IoU  {:.4}", summary.mean_iou)?;
    outln!("max F     {:.4}", summary.max_f)?;
    outln!("MAE       {:.4}", summary.mae)?;
    if let Some(share) = attention_inside {
        outln!("attention inside the object  {share:.4}")?;
    }

    if let Some(path) = &args.json {
        let rows: Vec<serde_json::Value> = scored
            .iter()
            .map(|(pair, s)| {
                json!({
                    "name": pair.stem,
                    "iou": s.scores.iou,
                    "mae": s.scores.mae,
                    "max_f": s.scores.max_f(),
                    "attention_inside": s.attention_inside,
                })
            })
            .collect();
        let head = match &loaded {
            Some((model, _)) => args.head.name(model).to_string(),
            None => "predictions".to_string(),
        };
        let report = json!({
            "head": head,
            "threshold": args.head.threshold,
            "images": summary.images,
            "mean_iou": summary.mean_iou,
            "max_f": summary.max_f,
            "mae": summary.mae,
            "attention_inside": attention_inside,
            "per_image": rows,
            "missing": missing,
            "unreadable": unreadable,
        });
        super::output::write_atomic(path, format!("{report:#}\n").as_bytes())?;
    }
    Ok(if unreadable.is_empty() { EXIT_OK } else { EXIT_SOME_FAILED })
}

fn score_pair(scorer: &Scorer, args: &EvalArgs, pair: &Pair) -> Result<Scored> {
    let photo = image_io::read_image(&Source::File(pair.image.clone()), Decoding::strict(args.work.max_pixels))?;
    let truth = read_gray(&pair.mask, &photo, args.work.max_pixels, "mask")?;
    let truth: Vec<bool> = truth.pixels().map(|p| p[0] >= 128).collect();
    let (soft, attention_inside) = match scorer {
        Scorer::Model { model, head } => {
            let size = args.model.short_side(model);
            let (map, looks) = head::segment_and_attention(model, *head, &photo, size)?;
            let soft = args.head.pixel_map(model, &map, &photo, size).values;
            (soft, Some(share_inside(&looks, &truth, photo.width() as usize)))
        }
        Scorer::Predictions(dir) => {
            let path = dir.join(format!("{}.png", pair.stem));
            let predicted = read_gray(&path, &photo, args.work.max_pixels, "prediction")?;
            (predicted.pixels().map(|p| p[0] as f32 / 255.0).collect(), None)
        }
    };
    Ok(Scored { scores: metrics::score(&soft, &truth, args.head.threshold), attention_inside })
}

/// A gray PNG that must be the size of `photo`.
fn read_gray(path: &Path, photo: &DynamicImage, max_pixels: u64, what: &str) -> Result<GrayImage> {
    let gray = image_io::read_image(&Source::File(path.to_path_buf()), Decoding::strict(max_pixels))
        .with_context(|| format!("{what} {}", path.display()))?
        .to_luma8();
    if gray.dimensions() != (photo.width(), photo.height()) {
        bail!(
            "{what} {} is {}x{}, the photo {}x{}",
            path.display(),
            gray.width(),
            gray.height(),
            photo.width(),
            photo.height()
        );
    }
    Ok(gray)
}

/// The share of `looks` (attention over the patch grid, which covers the
/// photo) that falls on patches of the object, each patch counting the
/// fraction of its pixels that `truth` marks.
fn share_inside(looks: &PatchMap, truth: &[bool], width: usize) -> f64 {
    let height = truth.len() / width.max(1);
    let (rows, cols) = (looks.grid.rows, looks.grid.cols);
    let mut object = vec![0u64; rows * cols];
    let mut pixels = vec![0u64; rows * cols];
    for (i, &t) in truth.iter().enumerate() {
        let cell = (i / width * rows / height) * cols + (i % width) * cols / width;
        object[cell] += t as u64;
        pixels[cell] += 1;
    }
    let total: f64 = looks.values.iter().map(|&v| v as f64).sum();
    let inside: f64 = (looks.values.iter().zip(object.iter().zip(&pixels)))
        .map(|(&v, (&o, &n))| v as f64 * o as f64 / n.max(1) as f64)
        .sum();
    if total > 0.0 { inside / total } else { 0.0 }
}
