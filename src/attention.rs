//! Where the model looks: the class token's attention over the patches, per
//! head, averaged, or rolled out through all layers, as maps on the patch grid.

use anyhow::{Context, Result, bail};
use candle_core::{D, Tensor};

use crate::maps::PatchMap;
use crate::model::EncoderOutput;
use crate::preprocess::PatchGrid;

/// The class token's attention to each patch in `layer`, one map per head.
/// Register tokens are left out: they are not places in the image.
pub fn cls_attention(out: &EncoderOutput, layer: usize) -> Result<Vec<PatchMap>> {
    let probabilities = out.attention(layer).with_context(|| format!("attention of layer {layer} was not captured"))?;
    let per_head =
        probabilities.get(0)?.narrow(1, 0, 1)?.squeeze(1)?.narrow(D::Minus1, out.num_prefix_tokens, out.grid.len())?;
    per_head.to_vec2::<f32>()?.into_iter().map(|values| PatchMap::new(out.grid, values)).collect()
}

/// One layer's queries and keys: all that a patch's attention row needs,
/// kept without the rest of the encoder's output.
#[derive(Debug, Clone)]
pub struct LayerKeys {
    /// (heads, tokens, head_dim) each.
    queries: Tensor,
    keys: Tensor,
    grid: PatchGrid,
    num_prefix_tokens: usize,
}

impl LayerKeys {
    /// The queries and keys `out` captured (see `Capture::and_qkv`).
    pub fn of(out: &EncoderOutput) -> Result<Self> {
        let qkv = out.qkv.as_ref().context("queries and keys were not captured")?;
        Ok(Self {
            queries: qkv.queries.get(0)?,
            keys: qkv.keys.get(0)?,
            grid: out.grid,
            num_prefix_tokens: out.num_prefix_tokens,
        })
    }

    pub fn grid(&self) -> PatchGrid {
        self.grid
    }

    /// Patch `patch`'s attention to every patch, one map per head: one row
    /// of each head's matrix, O(tokens), where keeping the matrices would
    /// be O(tokens²).
    pub fn patch_attention(&self, patch: usize) -> Result<Vec<PatchMap>> {
        if patch >= self.grid.len() {
            bail!("patch {patch} is past the {} patches", self.grid.len());
        }
        let query = self.queries.narrow(1, self.num_prefix_tokens + patch, 1)?;
        let scale = 1.0 / (query.dim(D::Minus1)? as f64).sqrt();
        let scores = (query.matmul(&self.keys.t()?)? * scale)?;
        let probabilities = candle_nn::ops::softmax_last_dim(&scores)?.squeeze(1)?;
        let per_head = probabilities.narrow(D::Minus1, self.num_prefix_tokens, self.grid.len())?;
        per_head.to_vec2::<f32>()?.into_iter().map(|values| PatchMap::new(self.grid, values)).collect()
    }
}

/// The average of several maps on the same grid.
pub fn mean_map(maps: &[PatchMap]) -> Result<PatchMap> {
    let first = maps.first().context("no maps to average")?;
    let mut values = vec![0f32; first.values.len()];
    for map in maps {
        for (acc, v) in values.iter_mut().zip(&map.values) {
            *acc += v / maps.len() as f32;
        }
    }
    PatchMap::new(first.grid, values)
}

/// Attention rollout (Abnar & Zuidema, 2020): multiply the head-averaged
/// attention of every layer, each mixed half-and-half with the identity for
/// the residual path, and read the class token's row. Needs every layer's
/// attention captured, in full or averaged over heads.
pub fn rollout(out: &EncoderOutput, num_layers: usize) -> Result<PatchMap> {
    // Only the class token's row of the product is wanted, so multiply a row
    // vector through the layers from the last down: O(L·N²), not O(L·N³).
    let mut row: Option<Tensor> = None;
    for layer in (0..num_layers).rev() {
        let probabilities =
            out.attention(layer).with_context(|| format!("attention of layer {layer} was not captured"))?;
        let mean = probabilities.get(0)?.mean(0)?;
        let tokens = mean.dim(0)?;
        let eye = Tensor::eye(tokens, mean.dtype(), mean.device())?;
        let mixed = ((mean + eye)? * 0.5)?;
        let mixed = mixed.broadcast_div(&mixed.sum_keepdim(1)?)?;
        row = Some(match row {
            Some(row) => row.matmul(&mixed)?,
            None => mixed.narrow(0, 0, 1)?,
        });
    }
    let row = row.context("the model has no layers")?;
    let cls_row = row.squeeze(0)?.narrow(0, out.num_prefix_tokens, out.grid.len())?;
    PatchMap::new(out.grid, cls_row.to_vec1()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preprocess::PatchGrid;

    #[test]
    fn rollout_is_the_class_row_of_the_layer_product() {
        let grid = PatchGrid { rows: 1, cols: 3 };
        let device = candle_core::Device::Cpu;
        // Two layers, two heads, 4 tokens (class + 3 patches), rows summing to 1.
        let layer = |seed: f32| {
            let raw = Tensor::arange(0f32, 32.0, &device)
                .unwrap()
                .affine(0.37, seed as f64)
                .unwrap()
                .sin()
                .unwrap()
                .exp()
                .unwrap();
            let raw = raw.reshape((1, 2, 4, 4)).unwrap();
            raw.broadcast_div(&raw.sum_keepdim(3).unwrap()).unwrap()
        };
        let attentions = vec![(0, layer(0.1)), (1, layer(0.7))];
        let mixed = |a: &Tensor| {
            let m = ((a.get(0).unwrap().mean(0).unwrap() + Tensor::eye(4, candle_core::DType::F32, &device).unwrap())
                .unwrap()
                * 0.5)
                .unwrap();
            m.broadcast_div(&m.sum_keepdim(1).unwrap()).unwrap()
        };
        let product = mixed(&attentions[1].1).matmul(&mixed(&attentions[0].1)).unwrap();
        let expected: Vec<f32> = product.get(0).unwrap().narrow(0, 1, 3).unwrap().to_vec1().unwrap();
        let tokens = Tensor::zeros((1, 4, 2), candle_core::DType::F32, &device).unwrap();
        let out = EncoderOutput { tokens, attentions, qkv: None, stem: Vec::new(), grid, num_prefix_tokens: 1 };
        let got = rollout(&out, 2).unwrap();
        for (g, e) in got.values.iter().zip(&expected) {
            assert!((g - e).abs() < 1e-6, "{g} vs {e}");
        }
    }
}
