//! Teaching the `linear` head on your own masks: patch tokens of the frozen
//! encoder in, the share of each patch the mask covers as the target,
//! BCE + soft Dice, AdamW.

use anyhow::{Context, Result, bail};
use candle_core::{D, DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use image::{DynamicImage, GrayImage, imageops};

use crate::metrics;
use crate::model::{Capture, Vit};
use crate::preprocess;

/// One image's training material: its patch tokens and targets.
#[derive(Debug, Clone)]
pub struct Example {
    /// (patches, hidden), row-major.
    pub tokens: Vec<f32>,
    /// Fraction of each patch inside the mask, in [0, 1].
    pub targets: Vec<f32>,
}

/// Share of each cell of a `rows` x `cols` grid covered by `mask` (>= 128).
pub fn patch_targets(mask: &GrayImage, rows: usize, cols: usize) -> Vec<f32> {
    let (w, h) = (mask.width() as usize, mask.height() as usize);
    let mut targets = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        let (y0, y1) = (r * h / rows, ((r + 1) * h / rows).max(r * h / rows + 1).min(h));
        for c in 0..cols {
            let (x0, x1) = (c * w / cols, ((c + 1) * w / cols).max(c * w / cols + 1).min(w));
            let inside = (y0..y1)
                .flat_map(|y| (x0..x1).map(move |x| (x, y)))
                .filter(|&(x, y)| mask.get_pixel(x as u32, y as u32)[0] >= 128)
                .count();
            targets.push(inside as f32 / ((y1 - y0) * (x1 - x0)) as f32);
        }
    }
    targets
}

/// Tokens and targets of one photo, mirrored left-right when `flip`.
pub fn extract(model: &Vit, photo: &DynamicImage, mask: &GrayImage, short_side: usize, flip: bool) -> Result<Example> {
    if mask.dimensions() != (photo.width(), photo.height()) {
        bail!("mask is {}x{}, the photo {}x{}", mask.width(), mask.height(), photo.width(), photo.height());
    }
    let (photo, mask) =
        if flip { (photo.fliph(), imageops::flip_horizontal(mask)) } else { (photo.clone(), mask.clone()) };
    let pixels = preprocess::model_input(&photo, short_side, model.config().patch_size)?;
    let out = model.forward(&pixels, &Capture::default())?;
    let patches = out.tokens.get(0)?.narrow(0, out.num_prefix_tokens, out.grid.len())?;
    Ok(Example {
        tokens: patches.flatten_all()?.to_vec1()?,
        targets: patch_targets(&mask, out.grid.rows, out.grid.cols),
    })
}

#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub epochs: usize,
    pub learning_rate: f64,
    /// Images per optimizer step.
    pub batch_images: usize,
    pub seed: u64,
}

#[derive(Debug, Clone)]
pub struct EpochReport {
    pub epoch: usize,
    pub train_loss: f64,
    pub val_loss: f64,
    pub val_iou: f64,
}

#[derive(Debug, Clone)]
pub struct TrainedHead {
    pub weight: Vec<f32>,
    pub bias: f32,
    pub best_epoch: usize,
    pub val_iou: f64,
}

/// A small deterministic generator (splitmix64) for splits and shuffles.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, (self.next_u64() % (i as u64 + 1)) as usize);
        }
    }
}

/// Indices 0..n split into (train, validation), `val_share` of them (at
/// least one when n >= 2) held out, the same for the same seed.
pub fn split(n: usize, val_share: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut order: Vec<usize> = (0..n).collect();
    Rng::new(seed).shuffle(&mut order);
    let held = if n < 2 { 0 } else { ((n as f64 * val_share).round() as usize).clamp(1, n - 1) };
    let val = order.split_off(n - held);
    (order, val)
}

fn stack(examples: &[&Example], hidden: usize) -> Result<(Tensor, Tensor)> {
    let tokens: Vec<f32> = examples.iter().flat_map(|e| e.tokens.iter().copied()).collect();
    let targets: Vec<f32> = examples.iter().flat_map(|e| e.targets.iter().copied()).collect();
    let rows = targets.len();
    Ok((Tensor::from_vec(tokens, (rows, hidden), &Device::Cpu)?, Tensor::from_vec(targets, rows, &Device::Cpu)?))
}

/// Binary cross-entropy on logits (the stable form) plus soft Dice.
fn loss(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let bce = (logits.relu()? - (logits * targets)? + (logits.abs()?.neg()?.exp()? + 1.0)?.log()?)?.mean_all()?;
    let probabilities = candle_nn::ops::sigmoid(logits)?;
    let overlap = (&probabilities * targets)?.sum_all()?;
    let total = (probabilities.sum_all()? + targets.sum_all()?)?;
    let dice = (((overlap * 2.0)? + 1.0)? / (total + 1.0)?)?;
    Ok((bce + (dice.neg()? + 1.0)?)?)
}

/// Mean per-image IoU of the patches predicted >= 0.5 against targets >= 0.5.
fn mean_patch_iou(weight: &Tensor, bias: &Tensor, examples: &[&Example], hidden: usize) -> Result<f64> {
    let mut total = 0.0;
    for example in examples {
        let (x, _) = stack(&[example], hidden)?;
        let logits = x.matmul(weight)?.squeeze(D::Minus1)?.broadcast_add(bias)?;
        let probabilities: Vec<f32> = candle_nn::ops::sigmoid(&logits)?.to_vec1()?;
        let truth: Vec<bool> = example.targets.iter().map(|&t| t >= 0.5).collect();
        total += metrics::score(&probabilities, &truth, 0.5).iou;
    }
    Ok(total / examples.len().max(1) as f64)
}

/// Trains on `train`, keeps the epoch with the best IoU on `val`.
pub fn train(
    train: &[&Example],
    val: &[&Example],
    hidden: usize,
    config: &TrainConfig,
    mut on_epoch: impl FnMut(&EpochReport),
) -> Result<TrainedHead> {
    if train.is_empty() || val.is_empty() {
        bail!("need at least one training and one validation image");
    }
    let weight = Var::zeros((hidden, 1), DType::F32, &Device::Cpu)?;
    let bias = Var::zeros(1, DType::F32, &Device::Cpu)?;
    let params = ParamsAdamW { lr: config.learning_rate, weight_decay: 1e-4, ..ParamsAdamW::default() };
    let mut optimizer = AdamW::new(vec![weight.clone(), bias.clone()], params)?;
    let (val_x, val_t) = stack(val, hidden)?;
    let mut rng = Rng::new(config.seed ^ 0x5eed);
    let mut order: Vec<usize> = (0..train.len()).collect();
    let mut best: Option<TrainedHead> = None;
    for epoch in 1..=config.epochs {
        rng.shuffle(&mut order);
        let mut train_loss = 0.0;
        let batches: Vec<&[usize]> = order.chunks(config.batch_images.max(1)).collect();
        for batch in &batches {
            let examples: Vec<&Example> = batch.iter().map(|&i| train[i]).collect();
            let (x, t) = stack(&examples, hidden)?;
            let logits = x.matmul(weight.as_tensor())?.squeeze(D::Minus1)?.broadcast_add(bias.as_tensor())?;
            let step_loss = loss(&logits, &t)?;
            optimizer.backward_step(&step_loss)?;
            train_loss += step_loss.to_scalar::<f32>()? as f64 / batches.len() as f64;
        }
        let val_logits = val_x.matmul(weight.as_tensor())?.squeeze(D::Minus1)?.broadcast_add(bias.as_tensor())?;
        let report = EpochReport {
            epoch,
            train_loss,
            val_loss: loss(&val_logits, &val_t)?.to_scalar::<f32>()? as f64,
            val_iou: mean_patch_iou(weight.as_tensor(), bias.as_tensor(), val, hidden)?,
        };
        on_epoch(&report);
        if best.as_ref().is_none_or(|b| report.val_iou > b.val_iou) {
            best = Some(TrainedHead {
                weight: weight.as_tensor().flatten_all()?.to_vec1()?,
                bias: bias.as_tensor().to_vec1::<f32>()?[0],
                best_epoch: epoch,
                val_iou: report.val_iou,
            });
        }
    }
    best.context("no epochs were run")
}
