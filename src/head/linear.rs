//! A learned classifier on the final patch tokens: what trained models ship.
//!
//! Each patch token gets `s²` logits, one per cell of an `s x s` split of
//! the patch (`s` = 1 for the plain per-patch head `train-head` makes), so a
//! head can draw edges finer than the patch grid.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Result, anyhow, bail};
use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use safetensors::tensor::TensorView;

use super::{HeadMap, SegmentationHead};
use crate::maps::PatchMap;
use crate::model::weights::{map_file, safetensors_metadata};
use crate::model::{Capture, EncoderOutput, Vit};
use crate::preprocess::PatchGrid;

/// Where a checkpoint keeps a linear head: in its own file, or beside the
/// encoder's tensors in the model's.
const PREFIX: &str = "head.";
pub const WEIGHT: &str = "head.weight";
pub const BIAS: &str = "head.bias";
/// Safetensors metadata key holding [`Vit::fingerprint`] of the training backbone.
pub const FINGERPRINT_KEY: &str = "segattn_backbone_fingerprint";

#[derive(Debug, Clone)]
pub struct LinearHead {
    /// (hidden, s²)
    weight: Tensor,
    /// (s²)
    bias: Tensor,
    /// Cells per patch side.
    split: usize,
}

impl LinearHead {
    /// Reads `head.weight` (`[s², hidden]`, or `[hidden]` for s = 1) and
    /// `head.bias` (`[s²]`) from a side file. A head that records the backbone
    /// it was trained on must be used with that one.
    pub fn load(path: &Path, model: &Vit) -> Result<Self> {
        let file = path.display();
        let unreadable = |e: safetensors::SafeTensorError| anyhow!("{file}: not a readable safetensors file: {e}");
        let map = map_file(path)?;
        if let Some(trained_on) = safetensors_metadata(&map).map_err(unreadable)?.remove(FINGERPRINT_KEY)
            && trained_on != model.fingerprint()
        {
            bail!(
                "{file}: this head was trained on another backbone (fingerprint {trained_on}), not {} (fingerprint {})",
                model.files().weights.display(),
                model.fingerprint()
            );
        }
        let tensors = safetensors::SafeTensors::deserialize(&map).map_err(unreadable)?;
        let read = |name: &str| -> Result<Tensor> {
            let view = tensors
                .tensor(name)
                .map_err(|_| anyhow!("{file}: no `{name}` tensor (a linear head needs {WEIGHT} and {BIAS})"))?;
            let tensor = view
                .load(&Device::Cpu)
                .and_then(|t| t.to_dtype(DType::F32))
                .map_err(|e| anyhow!("{file}: cannot read `{name}`: {e}"))?;
            // A NaN or an infinity makes every mask black: a broken head, not a mask.
            if !tensor.flatten_all()?.to_vec1::<f32>()?.iter().all(|v| v.is_finite()) {
                bail!("{file}: `{name}` holds NaN or infinite values");
            }
            Ok(tensor)
        };
        Self::new(&read(WEIGHT)?, &read(BIAS)?, model).map_err(|e| anyhow!("{file}: {e}"))
    }

    /// The head that came inside the model's own checkpoint, if it has one.
    pub fn bundled(model: &Vit) -> Result<Option<Self>> {
        let Some((weight, bias)) = bundled_tensors(model) else { return Ok(None) };
        let head = Self::new(weight, bias, model).map_err(|e| anyhow!("{}: {e}", model.files().weights.display()))?;
        Ok(Some(head))
    }

    /// Cells per side of a patch: the head classifies s x s cells of each.
    pub fn cells_per_side(&self) -> usize {
        self.split
    }

    fn new(weight: &Tensor, bias: &Tensor, model: &Vit) -> Result<Self> {
        let hidden_size = model.config().hidden_size;
        let cells = weight.elem_count() / hidden_size.max(1);
        let split = cells.isqrt();
        let shape_ok = match weight.dims() {
            [h] => *h == hidden_size,
            [c, h] => *h == hidden_size && *c == cells,
            _ => false,
        };
        if !shape_ok || split * split != cells || cells == 0 {
            bail!("`{WEIGHT}` has shape {:?}, expected [s², {hidden_size}] for this backbone", weight.dims());
        }
        if bias.elem_count() != cells {
            bail!("`{BIAS}` has shape {:?}, expected [{cells}]", bias.dims());
        }
        Ok(Self { weight: weight.reshape((cells, hidden_size))?.t()?.contiguous()?, bias: bias.flatten_all()?, split })
    }
}

/// `head.weight` and `head.bias` in the model's own checkpoint, when it
/// carries both.
pub(super) fn bundled_tensors(model: &Vit) -> Option<(&Tensor, &Tensor)> {
    let tensors = model.extra_tensors(PREFIX);
    Some((*tensors.get("weight")?, *tensors.get("bias")?))
}

/// A per-patch head (`head.weight` `[1, hidden]`, `head.bias` `[1]`) as a
/// safetensors file's bytes, with the backbone's fingerprint, which
/// [`LinearHead::load`] checks, and `notes` as metadata.
pub fn to_safetensors(weight: &[f32], bias: f32, model: &Vit, notes: &[(&str, String)]) -> Result<Vec<u8>> {
    let weight_bytes: Vec<u8> = weight.iter().flat_map(|v| v.to_le_bytes()).collect();
    let bias_bytes = bias.to_le_bytes();
    let views = [
        (WEIGHT, TensorView::new(safetensors::Dtype::F32, vec![1, weight.len()], &weight_bytes)?),
        (BIAS, TensorView::new(safetensors::Dtype::F32, vec![1], &bias_bytes)?),
    ];
    let mut metadata = HashMap::from([
        (FINGERPRINT_KEY.to_string(), model.fingerprint().to_string()),
        ("backbone_weights".to_string(), model.files().weights.display().to_string()),
    ]);
    metadata.extend(notes.iter().map(|(key, value)| (key.to_string(), value.clone())));
    Ok(safetensors::serialize(views, Some(metadata))?)
}

impl SegmentationHead for LinearHead {
    fn capture(&self, _model: &Vit) -> Capture {
        Capture::default()
    }

    fn predict(&self, _model: &Vit, out: &EncoderOutput) -> Result<HeadMap> {
        let patches = out.tokens.get(0)?.narrow(0, out.num_prefix_tokens, out.grid.len())?;
        // (patches, s²): row r, column c, cell (i, j) goes to fine row r·s + i, column c·s + j.
        let logits = patches.matmul(&self.weight)?.broadcast_add(&self.bias)?;
        let (rows, cols, s) = (out.grid.rows, out.grid.cols, self.split);
        let fine = logits.reshape((rows, cols, s, s))?.permute((0, 2, 1, 3))?.flatten_all()?;
        let grid = PatchGrid { rows: rows * s, cols: cols * s };
        Ok(HeadMap::logits(PatchMap::new(grid, fine.to_vec1()?)?))
    }
}
