//! `segattn train-head`: fit the `linear` head to your own photos and masks.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;

use super::jobs::{self, Pair};
use super::{EXIT_OK, EXIT_SOME_FAILED, ModelArgs, PairArgs, WorkArgs, batch, values};
use crate::head::linear;
use crate::image_io::{self, Decoding, Source};
use crate::model::Vit;
use crate::train::{self, Example, TrainConfig};

#[derive(Debug, Args)]
pub struct TrainHeadArgs {
    #[command(flatten)]
    pairs: PairArgs,
    #[command(flatten)]
    model: ModelArgs,
    /// Where to write the head (safetensors: head.weight, head.bias).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    #[arg(long, default_value_t = 30, value_parser = values::at_least_one)]
    epochs: usize,
    /// AdamW learning rate.
    #[arg(long, default_value_t = 5e-3, allow_negative_numbers = true, value_parser = values::above_zero_to_one::<f64>)]
    lr: f64,
    /// Share of the images held out to pick the best epoch.
    #[arg(long, default_value_t = 0.1, allow_negative_numbers = true, value_parser = values::zero_to_below_one)]
    val_split: f64,
    /// Seed of the train/validation split and the shuffling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    work: WorkArgs,
}

/// The original and its mirror image.
fn examples_of(model: &Vit, pair: &Pair, size: usize, decoding: Decoding) -> Result<[Example; 2]> {
    let photo = image_io::read_image(&Source::File(pair.image.clone()), decoding)?;
    let mask = image_io::read_image(&Source::File(pair.mask.clone()), decoding)
        .with_context(|| format!("mask {}", pair.mask.display()))?
        .to_luma8();
    Ok([train::extract(model, &photo, &mask, size, false)?, train::extract(model, &photo, &mask, size, true)?])
}

pub fn run(args: TrainHeadArgs) -> Result<u8> {
    let (pairs, missing) = args.pairs.pair()?;
    for line in &missing {
        note!("segattn: {line}");
    }
    let model = args.model.load()?;
    let read = pairs.iter().flat_map(|p| [p.image.as_path(), p.mask.as_path()]);
    jobs::refuse_overwrite(&args.out, read.chain(ModelArgs::files_of(&model)))?;
    let (train_ids, val_ids) = train::split(pairs.len(), args.val_split, args.seed);
    if val_ids.is_empty() {
        bail!("need at least two photo/mask pairs to train and validate");
    }

    note!("extracting patch tokens of {} photos", pairs.len());
    let extracted = batch::for_each(
        &pairs,
        |pair| pair.image.display().to_string(),
        args.work.jobs,
        |pair| examples_of(&model, pair, args.model.short_side(&model), Decoding::strict(args.work.max_pixels)),
    )?;
    let failed = extracted.iter().filter(|e| e.is_none()).count();
    // Flips augment training only; validation sees the photos as they are.
    let train_set: Vec<&Example> = train_ids.iter().filter_map(|&i| extracted[i].as_ref()).flatten().collect();
    let val_set: Vec<&Example> = val_ids.iter().filter_map(|&i| extracted[i].as_ref().map(|e| &e[0])).collect();

    let config = TrainConfig { epochs: args.epochs, learning_rate: args.lr, batch_images: 8, seed: args.seed };
    let width = args.epochs.to_string().len();
    let head = train::train(&train_set, &val_set, model.config().hidden_size, &config, |r| {
        note!(
            "epoch {:>width$}/{}  train loss {:.4}  val loss {:.4}  val IoU {:.4}",
            r.epoch,
            args.epochs,
            r.train_loss,
            r.val_loss,
            r.val_iou
        );
    })?;
    let notes = [("best_epoch", head.best_epoch.to_string()), ("val_iou", format!("{:.4}", head.val_iou))];
    super::output::write_atomic(&args.out, &linear::to_safetensors(&head.weight, head.bias, &model, &notes)?)?;
    outln!(
        "wrote {} (epoch {}, val IoU {:.4}, {} training / {} validation photos)",
        args.out.display(),
        head.best_epoch,
        head.val_iou,
        train_set.len() / 2,
        val_set.len()
    )?;
    Ok(if failed == 0 { EXIT_OK } else { EXIT_SOME_FAILED })
}
