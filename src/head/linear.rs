//! A learned per-patch classifier on the final tokens: what trained models ship.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use anyhow::{Result, anyhow, bail};
use candle_core::safetensors::{Load, MmapedSafetensors};
use candle_core::{DType, Device, Tensor};

use super::{HeadMap, SegmentationHead};
use crate::attention::PatchMap;
use crate::model::{Capture, EncoderOutput, Vit};

pub const WEIGHT: &str = "head.weight";
pub const BIAS: &str = "head.bias";
/// Safetensors metadata key holding [`Vit::fingerprint`] of the training backbone.
pub const FINGERPRINT_KEY: &str = "segattn_backbone_fingerprint";

#[derive(Debug, Clone)]
pub struct LinearHead {
    /// (hidden, 1)
    weight: Tensor,
    bias: f32,
}

impl LinearHead {
    /// Reads `head.weight` ([1, hidden] or [hidden]) and `head.bias` ([1] or
    /// []) from `path`: a side file, or the backbone's own checkpoint. A head
    /// that records the backbone it was trained on must be used with that one.
    pub fn load(path: &Path, model: &Vit) -> Result<Self> {
        let file = path.display();
        let hidden_size = model.config().hidden_size;
        if let Some(trained_on) = metadata(path)?.remove(FINGERPRINT_KEY)
            && trained_on != model.fingerprint()
        {
            bail!(
                "{file}: this head was trained on another backbone (fingerprint {trained_on}), not {} (fingerprint {})",
                model.files().weights.display(),
                model.fingerprint()
            );
        }
        // SAFETY: read-only mapping of a file nobody should truncate while we run.
        let tensors = unsafe { MmapedSafetensors::new(path) }
            .map_err(|e| anyhow!("{file}: not a readable safetensors file: {e}"))?;
        let read = |name: &str| -> Result<Tensor> {
            let view = tensors
                .get(name)
                .map_err(|_| anyhow!("{file}: no `{name}` tensor (a linear head needs {WEIGHT} and {BIAS})"))?;
            view.load(&Device::Cpu)
                .and_then(|t| t.to_dtype(DType::F32))
                .map_err(|e| anyhow!("{file}: cannot read `{name}`: {e}"))
        };
        let weight = read(WEIGHT)?;
        if weight.elem_count() != hidden_size || weight.dims().iter().filter(|&&d| d != 1).count() > 1 {
            bail!("{file}: `{WEIGHT}` has shape {:?}, expected [1, {hidden_size}] for this backbone", weight.dims());
        }
        let bias = read(BIAS)?;
        if bias.elem_count() != 1 {
            bail!("{file}: `{BIAS}` has shape {:?}, expected [1]", bias.dims());
        }
        Ok(Self { weight: weight.reshape((hidden_size, 1))?, bias: bias.flatten_all()?.to_vec1::<f32>()?[0] })
    }
}

/// The `__metadata__` of a safetensors file, read from its header only.
fn metadata(path: &Path) -> Result<HashMap<String, String>> {
    let file = path.display();
    let mut reader = std::fs::File::open(path).map_err(|e| anyhow!("{file}: cannot open: {e}"))?;
    let mut length = [0u8; 8];
    reader.read_exact(&mut length).map_err(|_| anyhow!("{file}: not a readable safetensors file"))?;
    let length = u64::from_le_bytes(length);
    if length > 100_000_000 {
        bail!("{file}: not a readable safetensors file (header of {length} bytes)");
    }
    let mut header = vec![0u8; length as usize];
    reader
        .read_exact(&mut header)
        .map_err(|_| anyhow!("{file}: not a readable safetensors file (truncated header)"))?;
    let header: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| anyhow!("{file}: not a readable safetensors file: {e}"))?;
    Ok(header
        .get("__metadata__")
        .and_then(|m| m.as_object())
        .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
        .unwrap_or_default())
}

impl SegmentationHead for LinearHead {
    fn capture(&self, _model: &Vit) -> Capture {
        Capture::default()
    }

    fn predict(&self, _model: &Vit, out: &EncoderOutput) -> Result<HeadMap> {
        let patches = out.tokens.get(0)?.narrow(0, out.num_prefix_tokens, out.grid.len())?;
        let logits = (patches.matmul(&self.weight)?.squeeze(1)? + self.bias as f64)?;
        Ok(HeadMap::logits(PatchMap::new(out.grid, logits.to_vec1()?)?))
    }
}
