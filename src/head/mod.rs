//! Segmentation heads: from the encoder's output to a foreground probability
//! per patch. Every head's map is in [0, 1] with 0.5 as its natural threshold.

mod mass;

use anyhow::Result;
use candle_core::Device;
use image::DynamicImage;

pub use mass::AttentionMass;

use crate::attention::PatchMap;
use crate::model::{Capture, EncoderOutput, Vit};
use crate::preprocess;

pub trait SegmentationHead: Send + Sync {
    /// What the encoder must keep for this head.
    fn capture(&self, model: &Vit) -> Capture;

    /// Foreground probability per patch.
    fn soft_map(&self, model: &Vit, out: &EncoderOutput) -> Result<PatchMap>;
}

/// Runs `image` through the encoder at `short_side` and returns `head`'s map.
pub fn segment(
    model: &Vit,
    head: &dyn SegmentationHead,
    image: &DynamicImage,
    short_side: usize,
) -> Result<PatchMap> {
    let pixels =
        preprocess::model_input(image, short_side, model.config().patch_size, &Device::Cpu)?;
    let out = model.forward(&pixels, &head.capture(model))?;
    head.soft_map(model, &out)
}
