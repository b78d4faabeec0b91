//! segattn's own model, trained by `train/train.py` on `../shared/data` and
//! compiled into the binary so that the main job works offline on a fresh
//! machine: a ViT-S/16-style encoder (convolutional stem, 6 layers of 3
//! heads of 64) with a sub-patch segmentation head, stored as f16.

/// The name `--model` and `segattn list` know it by.
pub const NAME: &str = "segattn-s16";

/// How messages name its weights, which have no path.
pub const DISPLAY_NAME: &str = "segattn-s16 (built in)";

pub static SAFETENSORS: &[u8] = include_bytes!("../../weights/segattn-s16.safetensors");
