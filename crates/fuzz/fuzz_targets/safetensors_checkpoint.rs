//! A checkpoint file as `--weights model.safetensors` reads it: the header,
//! offsets, dtypes and shapes, the configuration in its metadata, and
//! whatever model that makes, which must then segment a photo or fail.
#![no_main]

use libfuzzer_sys::fuzz_target;
use segattn::model::Vit;
use segattn_fuzz::{check_model, scratch_file};

fuzz_target!(|bytes: &[u8]| {
    let path = scratch_file("safetensors/model.safetensors", bytes);
    if let Ok(model) = Vit::load(&path) {
        check_model(&model);
    }
});
