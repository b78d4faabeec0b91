//! A linear head's file (`--head-weights`), read against a fixed model and
//! then used: its shapes, dtypes, values and backbone fingerprint.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use segattn::head::{self, LinearHead};
use segattn::model::Vit;
use segattn_fuzz::{check_map, fixture, scratch_file};

fn model() -> &'static Vit {
    static MODEL: OnceLock<Vit> = OnceLock::new();
    MODEL.get_or_init(|| Vit::load(&fixture("dino_vit")).expect("fixture model"))
}

fuzz_target!(|bytes: &[u8]| {
    let path = scratch_file("head/head.safetensors", bytes);
    let model = model();
    let Ok(linear) = LinearHead::load(&path, model) else {
        return;
    };
    let photo = image::DynamicImage::ImageRgb8(image::RgbImage::new(24, 40));
    if let Ok(map) = head::segment(model, &linear, &photo, 16) {
        check_map(&map.to_pixels(photo.width(), photo.height()).values);
    }
});
