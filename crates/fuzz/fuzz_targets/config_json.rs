//! `config.json` beside a checkpoint, as in a Hugging Face snapshot: every
//! field it may contradict or stretch the tensors with.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use segattn::model::Vit;
use segattn_fuzz::{check_model, fixture, scratch_file};

fn snapshot() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let weights = std::fs::read(fixture("dino_vit/model.safetensors")).expect("fixture");
        scratch_file("snapshot/model.safetensors", &weights).parent().expect("a directory").to_path_buf()
    })
}

fuzz_target!(|bytes: &[u8]| {
    let dir = snapshot();
    std::fs::write(dir.join("config.json"), bytes).expect("scratch file");
    if let Ok(model) = Vit::load(dir) {
        check_model(&model);
    }
});
