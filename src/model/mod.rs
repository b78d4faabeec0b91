//! The ViT encoder and how its weights are found and read.

pub mod builtin;
pub mod config;
pub mod conv;
mod fused;
pub mod interpolate;
pub mod panel_cache;
pub mod torch_archive;
pub mod vit;
pub mod weights;

pub use config::VitConfig;
pub use conv::ChannelsLastConv;
pub use fused::{
    Precision, is_available as precision_is_available, unavailable_because as precision_unavailable_because,
};
pub use interpolate::PosInterpolation;
pub use panel_cache::PanelCache;
pub use vit::{Capture, EncoderOutput, Keep, Qkv, Vit};
pub use weights::{ModelFiles, WEIGHT_FILES};
