//! Segmentation heads: from the encoder's output to a foreground map on the
//! patch grid, then to the photo's pixels.
//!
//! - [`AttentionMass`] (`attn`): DINO's recipe, no training, any DINO model.
//! - [`NormalizedCut`] (`ncut`): TokenCut's graph cut of last-layer keys.
//! - [`LinearHead`] (`linear`): a trained per-patch classifier.
//! - [`DecoderHead`] (`decoder`): a trained decoder reading the stem too.

mod decoder;
pub mod linear;
mod mass;
mod ncut;
mod refine;

use anyhow::{Result, bail};
use image::DynamicImage;

pub use decoder::DecoderHead;
pub use linear::LinearHead;
pub use mass::{AttentionMass, mass_keep};
pub use ncut::{Affinity, NormalizedCut, fiedler_vector, fiedler_vector_dense, foreground_component};
pub use refine::{guided_filter, refine_to_photo};

use crate::attention;
use crate::maps::{PatchMap, PixelMap};
use crate::model::{Capture, EncoderOutput, Keep, Vit};
use crate::preprocess;

/// Whether `model`'s checkpoint carries a trained decoder.
pub fn has_bundled_decoder(model: &Vit) -> bool {
    !model.extra_tensors(decoder::PREFIX).is_empty()
}

/// Whether `model`'s checkpoint carries a trained linear head.
pub fn has_bundled_linear(model: &Vit) -> bool {
    linear::bundled_tensors(model).is_some()
}

/// Checks the settings `model`'s checkpoint carries for the heads, so that
/// a broken one fails whichever head then runs, as a broken tensor does.
pub fn check_bundled_settings(model: &Vit) -> Result<()> {
    NormalizedCut::for_model(model).map(drop)
}

/// What a head's patch values mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapKind {
    /// Already in [0, 1].
    Probability,
    /// Raw scores: upsampled as they are, then squashed with a sigmoid.
    Logit,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HeadMap {
    pub patches: PatchMap,
    pub kind: MapKind,
}

impl HeadMap {
    pub fn probability(patches: PatchMap) -> Self {
        Self { patches, kind: MapKind::Probability }
    }

    pub fn logits(patches: PatchMap) -> Self {
        Self { patches, kind: MapKind::Logit }
    }

    /// Foreground probability per pixel of a `width` x `height` photo.
    pub fn to_pixels(&self, width: u32, height: u32) -> PixelMap {
        let mut map = self.patches.upsample(width, height);
        if self.kind == MapKind::Logit {
            map.values.iter_mut().for_each(|v| *v = 1.0 / (1.0 + (-*v).exp()));
        }
        map
    }
}

pub trait SegmentationHead: Send + Sync {
    /// What the encoder must keep for this head.
    fn capture(&self, model: &Vit) -> Capture;

    /// The head's map on the patch grid.
    fn predict(&self, model: &Vit, out: &EncoderOutput) -> Result<HeadMap>;
}

/// The head trained with the model and stored in its file: its decoder
/// where it has one (segattn-s16 does), else its linear head; `None` for a
/// model with neither (DINO checkpoints).
pub fn own_head(model: &Vit) -> Result<Option<Box<dyn SegmentationHead>>> {
    if let Some(decoder) = DecoderHead::bundled(model)? {
        return Ok(Some(Box::new(decoder)));
    }
    Ok(LinearHead::bundled(model)?.map(|linear| Box::new(linear) as Box<dyn SegmentationHead>))
}

/// Runs `image` through the encoder at `short_side` and returns `head`'s map.
pub fn segment(model: &Vit, head: &dyn SegmentationHead, image: &DynamicImage, short_side: usize) -> Result<HeadMap> {
    let pixels = preprocess::model_input(image, short_side, model.config().patch_size)?;
    let out = model.forward(&pixels, &head.capture(model))?;
    finite(head.predict(model, &out)?)
}

/// A map with a NaN or an infinity in it (a head whose finite weights are
/// large enough to overflow, say) would become a mask of nothing, or of
/// everything: an error instead.
fn finite(map: HeadMap) -> Result<HeadMap> {
    if map.patches.values.iter().any(|v| !v.is_finite()) {
        bail!("the head's map of this photo holds NaN or infinite values: its weights are broken or too large");
    }
    Ok(map)
}

/// [`segment`], and from the same forward pass the class token's attention
/// in the last layer, averaged over heads: where the model looks.
pub fn segment_and_attention(
    model: &Vit,
    head: &dyn SegmentationHead,
    image: &DynamicImage,
    short_side: usize,
) -> Result<(HeadMap, PatchMap)> {
    let pixels = preprocess::model_input(image, short_side, model.config().patch_size)?;
    let last = model.config().num_layers - 1;
    let capture = head.capture(model).and_attention([last], Keep::ClsRow);
    let out = model.forward(&pixels, &capture)?;
    let looks = attention::mean_map(&attention::cls_attention(&out, last)?)?;
    Ok((finite(head.predict(model, &out)?)?, looks))
}
