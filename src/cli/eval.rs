//! `segattn eval`: score a head against ground-truth masks.

use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::json;

use super::jobs::Pair;
use super::{EXIT_OK, EXIT_SOME_FAILED, HeadArgs, ModelArgs, PairArgs, batch};
use crate::head::SegmentationHead;
use crate::image_io::{self, Source};
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
    /// Also write the scores, with one row per image, as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Images processed in parallel (default: all cores).
    #[arg(long, short = 'j', value_name = "N")]
    jobs: Option<usize>,
    /// Refuse images with more pixels than this.
    #[arg(long, value_name = "N", default_value_t = image_io::DEFAULT_MAX_PIXELS)]
    max_pixels: u64,
}

pub fn run(args: EvalArgs) -> Result<u8> {
    let (pairs, missing) = args.pairs.pair()?;
    for line in &missing {
        eprintln!("segattn: {line}");
    }
    let model = args.model.load()?;
    let head = args.head.build(&model)?;
    let scored: Mutex<Vec<(String, ImageScores)>> = Mutex::new(Vec::new());
    let unreadable: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let work = |pair: &Pair| {
        let result = score_pair(&model, head.as_ref(), &args, pair);
        match result {
            Ok(scores) => {
                let row = json!({ "name": pair.stem, "iou": scores.iou, "mae": scores.mae, "max_f": scores.max_f() });
                scored.lock().expect("no panics while held").push((pair.stem.clone(), scores));
                Ok(row)
            }
            Err(err) => {
                unreadable.lock().expect("no panics while held").push(pair.image.display().to_string());
                Err(err)
            }
        }
    };
    let rows = Mutex::new(Vec::new());
    batch::for_each(
        &pairs,
        |p| p.image.display().to_string(),
        args.jobs,
        work,
        |row| rows.lock().expect("no panics while held").push(row),
    )?;

    let mut scored = scored.into_inner().expect("workers finished");
    scored.sort_by(|a, b| a.0.cmp(&b.0));
    let summary = metrics::summarize(&scored.iter().map(|(_, s)| s.clone()).collect::<Vec<_>>());
    println!("images    {}", summary.images);
    println!("mean IoU  {:.4}", summary.mean_iou);
    println!("max F     {:.4}", summary.max_f);
    println!("MAE       {:.4}", summary.mae);

    let unreadable = unreadable.into_inner().expect("workers finished");
    if let Some(path) = &args.json {
        let mut rows = rows.into_inner().expect("workers finished");
        rows.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        let report = json!({
            "head": format!("{:?}", args.head.head).to_lowercase(),
            "threshold": args.head.threshold,
            "images": summary.images,
            "mean_iou": summary.mean_iou,
            "max_f": summary.max_f,
            "mae": summary.mae,
            "per_image": rows,
            "missing": missing,
            "unreadable": unreadable,
        });
        image_io::write_atomic(path, format!("{report:#}\n").as_bytes())?;
    }
    Ok(if unreadable.is_empty() { EXIT_OK } else { EXIT_SOME_FAILED })
}

fn score_pair(model: &Vit, head: &dyn SegmentationHead, args: &EvalArgs, pair: &Pair) -> Result<ImageScores> {
    let photo = image_io::read_image(&Source::File(pair.image.clone()), args.max_pixels)?;
    let truth = image_io::read_image(&Source::File(pair.mask.clone()), args.max_pixels)
        .with_context(|| format!("mask {}", pair.mask.display()))?
        .to_luma8();
    if truth.dimensions() != (photo.width(), photo.height()) {
        bail!(
            "mask {} is {}x{}, the photo {}x{}",
            pair.mask.display(),
            truth.width(),
            truth.height(),
            photo.width(),
            photo.height()
        );
    }
    let soft = args.head.pixel_map(model, head, &photo, args.model.size)?;
    let truth: Vec<bool> = truth.pixels().map(|p| p[0] >= 128).collect();
    Ok(metrics::score(&soft.values, &truth, args.head.threshold))
}
