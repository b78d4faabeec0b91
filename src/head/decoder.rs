//! A trained decoder with skips from the convolutional stem (segattn-s16's
//! own head): the patch tokens, upsampled twice, each time joined by the
//! stem's output at that scale, so the mask follows edges finer than the
//! patch grid.
//!
//! Tokens (R, C, D) -> 1x1 `reduce` -> 2x bilinear -> concat stem 1/8 ->
//! 3x3 `up8` + ReLU -> 2x bilinear -> concat stem 1/4 -> 3x3 `up4` + ReLU ->
//! 1x1 `out`: logits at (4R, 4C). Maps are channels last throughout; batch
//! norms are folded into the convolutions by the exporter (train/model.py).

use std::collections::BTreeMap;

use anyhow::{Context, Result, anyhow, bail};
use candle_core::{D, Tensor};

use super::{HeadMap, SegmentationHead};
use crate::maps::PatchMap;
use crate::model::{Capture, ChannelsLastConv, EncoderOutput, Vit};
use crate::preprocess::PatchGrid;

/// A decoder's tensors are named with this in the model's checkpoint.
pub(super) const PREFIX: &str = "decoder.";

/// The stem layers the decoder reads: their outputs are at 1/4 and 1/8 of
/// the input, 4x and 2x the patch grid under 16-pixel patches.
const QUARTER: usize = 1;
const EIGHTH: usize = 2;

#[derive(Debug, Clone)]
pub struct DecoderHead {
    reduce: ChannelsLastConv,
    up8: ChannelsLastConv,
    up4: ChannelsLastConv,
    out: ChannelsLastConv,
}

impl DecoderHead {
    /// The decoder that came inside the model's own checkpoint, if it has one.
    pub fn bundled(model: &Vit) -> Result<Option<Self>> {
        let tensors = model.extra_tensors(PREFIX);
        if tensors.is_empty() {
            return Ok(None);
        }
        Self::new(&tensors, model).map(Some).map_err(|e| anyhow!("{}: {e}", model.files().weights.display()))
    }

    fn new(tensors: &BTreeMap<&str, &Tensor>, model: &Vit) -> Result<Self> {
        let config = model.config();
        let stem = &config.stem_channels;
        if stem.len() != 3 || config.patch_size != 16 {
            bail!("a decoder needs a 3-layer convolutional stem under 16-pixel patches");
        }
        let reduce = conv(tensors, "reduce", 1, config.hidden_size)?;
        let up8 = conv(tensors, "up8", 3, reduce.outputs() + stem[EIGHTH])?;
        let up4 = conv(tensors, "up4", 3, up8.outputs() + stem[QUARTER])?;
        let out = conv(tensors, "out", 1, up4.outputs())?;
        if out.outputs() != 1 {
            bail!("`{PREFIX}out.weight` has {} outputs, expected 1 (object logits)", out.outputs());
        }
        Ok(Self { reduce, up8, up4, out })
    }
}

/// `name`.weight (_, `inputs`, `kernel`, `kernel`) and `name`.bias.
fn conv(tensors: &BTreeMap<&str, &Tensor>, name: &str, kernel: usize, inputs: usize) -> Result<ChannelsLastConv> {
    let read = |part: &str| {
        tensors
            .get(format!("{name}.{part}").as_str())
            .copied()
            .with_context(|| format!("no `{PREFIX}{name}.{part}` tensor"))
    };
    let conv = ChannelsLastConv::new(read("weight")?, read("bias")?, 1).with_context(|| format!("`{PREFIX}{name}`"))?;
    if conv.kernel() != kernel || conv.inputs() != inputs {
        bail!(
            "`{PREFIX}{name}.weight` has shape {:?}, expected [_, {inputs}, {kernel}, {kernel}]",
            read("weight")?.dims()
        );
    }
    Ok(conv)
}

/// 2x bilinear upsampling of a channels-last map (1, H, W, C), as PyTorch's
/// `interpolate(scale_factor=2, mode="bilinear", align_corners=False)`: each
/// output pixel is 3/4 of its source pixel and 1/4 of the neighbour on its
/// side, clamped at the borders.
fn upsample2(x: &Tensor) -> Result<Tensor> {
    let (_, h, w, c) = x.dims4()?;
    let values = x.flatten_all()?.to_vec1::<f32>()?;
    // Output index 2i takes i and its neighbour before; 2i + 1 the one after.
    let sources = |n: usize| -> Vec<(usize, usize)> {
        (0..2 * n)
            .map(|o| (o / 2, if o % 2 == 0 { (o / 2).saturating_sub(1) } else { (o / 2 + 1).min(n - 1) }))
            .collect()
    };
    let (rows, cols) = (sources(h), sources(w));
    let mut out = vec![0f32; 4 * h * w * c];
    for (oy, &(y, y_side)) in rows.iter().enumerate() {
        for (ox, &(x, x_side)) in cols.iter().enumerate() {
            let at = |y: usize, x: usize| &values[(y * w + x) * c..][..c];
            let (near, beside_x, beside_y, corner) = (at(y, x), at(y, x_side), at(y_side, x), at(y_side, x_side));
            let pixel = &mut out[(oy * 2 * w + ox) * c..][..c];
            for (i, v) in pixel.iter_mut().enumerate() {
                *v = 0.5625 * near[i] + 0.1875 * (beside_x[i] + beside_y[i]) + 0.0625 * corner[i];
            }
        }
    }
    Ok(Tensor::from_vec(out, (1, 2 * h, 2 * w, c), x.device())?)
}

impl SegmentationHead for DecoderHead {
    fn capture(&self, _model: &Vit) -> Capture {
        Capture::default().and_stem()
    }

    fn predict(&self, _model: &Vit, out: &EncoderOutput) -> Result<HeadMap> {
        let (Some(quarter), Some(eighth)) = (out.stem.get(QUARTER), out.stem.get(EIGHTH)) else {
            bail!("the decoder needs the stem's outputs: the forward pass did not keep them");
        };
        let grid = out.grid;
        let tokens = out.tokens.get(0)?.narrow(0, out.num_prefix_tokens, grid.len())?;
        let tokens = tokens.reshape((1, grid.rows, grid.cols, ()))?;
        let first = |stem: &Tensor| stem.narrow(0, 0, 1);
        let x = self.reduce.forward(&tokens)?;
        let x = self.up8.forward(&Tensor::cat(&[&upsample2(&x)?, &first(eighth)?], D::Minus1)?)?.relu()?;
        let x = self.up4.forward(&Tensor::cat(&[&upsample2(&x)?, &first(quarter)?], D::Minus1)?)?.relu()?;
        let logits = self.out.forward(&x)?;
        let (_, rows, cols, _) = logits.dims4()?;
        Ok(HeadMap::logits(PatchMap::new(PatchGrid { rows, cols }, logits.flatten_all()?.to_vec1()?)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// PyTorch's bilinear 2x (align_corners=False) written out per pixel:
    /// source coordinate (o + 0.5) / 2 - 0.5, clamped to the image.
    fn upsample2_reference(values: &[f32], h: usize, w: usize) -> Vec<f32> {
        let source = |o: usize, n: usize| {
            let s = ((o as f32 + 0.5) / 2.0 - 0.5).max(0.0);
            let i = (s.floor() as usize).min(n - 1);
            (i, (i + 1).min(n - 1), s - i as f32)
        };
        let mut out = vec![0.0; 4 * h * w];
        for oy in 0..2 * h {
            let (y0, y1, fy) = source(oy, h);
            for ox in 0..2 * w {
                let (x0, x1, fx) = source(ox, w);
                let at = |y: usize, x: usize| values[y * w + x];
                let top = at(y0, x0) * (1.0 - fx) + at(y0, x1) * fx;
                let bottom = at(y1, x0) * (1.0 - fx) + at(y1, x1) * fx;
                out[oy * 2 * w + ox] = top * (1.0 - fy) + bottom * fy;
            }
        }
        out
    }

    #[test]
    fn upsample2_is_pytorch_bilinear_per_channel() {
        for (h, w) in [(1, 1), (1, 4), (3, 5), (7, 2)] {
            let channel = |c: usize| -> Vec<f32> { (0..h * w).map(|i| ((i * 37 % 11 + c) as f32).sin()).collect() };
            let interleaved: Vec<f32> = (0..h * w).flat_map(|i| [channel(0)[i], channel(1)[i]]).collect();
            let x = Tensor::from_vec(interleaved, (1, h, w, 2), &Device::Cpu).unwrap();
            let up = upsample2(&x).unwrap();
            assert_eq!(up.dims(), [1, 2 * h, 2 * w, 2]);
            for c in 0..2 {
                let got = up.narrow(3, c, 1).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                for (g, e) in got.iter().zip(upsample2_reference(&channel(c), h, w)) {
                    assert!((g - e).abs() < 1e-6, "{h}x{w} channel {c}: {g} vs {e}");
                }
            }
        }
    }
}
