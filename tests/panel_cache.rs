//! Laid-out weights kept between runs (`model::PanelCache`): used when they
//! are this checkpoint's, whole, and for this CPU; laid out again otherwise.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use segattn::model::{Capture, PanelCache, Precision, Vit, precision_is_available};

mod common;
use common::{fixture, s, segattn_with, stderr};

/// A copy of a 64-dimension-head fixture, whose file this test may touch.
fn model_copy(dir: &Path) -> PathBuf {
    let model = dir.join("model");
    std::fs::create_dir(&model).unwrap();
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("vit_h64").join(file), model.join(file)).unwrap();
    }
    model
}

fn tokens(model: &Vit) -> Vec<f32> {
    let ramp: Vec<f32> = (0..3 * 48 * 64).map(|i| (i % 97) as f32 / 40.0 - 1.2).collect();
    let pixels = Tensor::from_vec(ramp, (1, 3, 48, 64), &Device::Cpu).unwrap();
    model.forward(&pixels, &Capture::default()).unwrap().tokens.flatten_all().unwrap().to_vec1().unwrap()
}

fn panel_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries.map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "panels")).collect()
}

#[test]
fn laid_out_weights_come_back_and_give_the_same_output() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_copy(dir.path());
    let cache = PanelCache::new(dir.path().join("cache")).keeping_any_size();
    // Where bfloat16 does not run, a bf16 load is an f32 load, and finds f32's file.
    let bf16_here = precision_is_available(Precision::Bf16);
    for precision in [Precision::F32, Precision::Bf16] {
        let expected = tokens(&Vit::load_in(&model, precision).unwrap());
        let first = Vit::load_cached(&model, precision, Some(&cache)).unwrap();
        let laid_out_before = precision == Precision::Bf16 && !bf16_here;
        assert_eq!(first.weights_from_cache(), laid_out_before, "{precision:?}: the first load");
        let second = Vit::load_cached(&model, precision, Some(&cache)).unwrap();
        assert!(second.weights_from_cache(), "{precision:?}: the first load left its weights");
        assert_eq!(tokens(&first), expected);
        assert_eq!(tokens(&second), expected, "{precision:?}: the cached weights multiply as the fresh ones");
    }
    // One file per precision that runs.
    assert_eq!(panel_files(cache.dir()).len(), if bf16_here { 2 } else { 1 });
}

#[test]
fn damaged_or_stale_panels_are_laid_out_again() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_copy(dir.path());
    let cache = PanelCache::new(dir.path().join("cache")).keeping_any_size();
    let expected = tokens(&Vit::load(&model).unwrap());
    Vit::load_cached(&model, Precision::F32, Some(&cache)).unwrap();
    let [file] = &panel_files(cache.dir())[..] else { panic!("one panel file") };

    // One flipped bit in the values: the checksum refuses them.
    let mut bytes = std::fs::read(file).unwrap();
    let last = bytes.len() - 9;
    bytes[last] ^= 0x10;
    std::fs::write(file, &bytes).unwrap();
    let reloaded = Vit::load_cached(&model, Precision::F32, Some(&cache)).unwrap();
    assert!(!reloaded.weights_from_cache(), "a damaged file was used");
    assert_eq!(tokens(&reloaded), expected);
    assert!(Vit::load_cached(&model, Precision::F32, Some(&cache)).unwrap().weights_from_cache(), "not rewritten");

    // Cut short.
    let bytes = std::fs::read(file).unwrap();
    std::fs::write(file, &bytes[..bytes.len() / 2]).unwrap();
    let reloaded = Vit::load_cached(&model, Precision::F32, Some(&cache)).unwrap();
    assert!(!reloaded.weights_from_cache(), "a truncated file was used");
    assert_eq!(tokens(&reloaded), expected);

    // The checkpoint changed since (here only its time): its old panels are not its own.
    let weights = model.join("model.safetensors");
    let later = std::fs::metadata(&weights).unwrap().modified().unwrap() + std::time::Duration::from_secs(5);
    std::fs::File::options().write(true).open(&weights).unwrap().set_modified(later).unwrap();
    assert!(!Vit::load_cached(&model, Precision::F32, Some(&cache)).unwrap().weights_from_cache());
    assert_eq!(panel_files(cache.dir()).len(), 2, "the new key has a file of its own");
}

#[test]
fn a_cache_that_cannot_be_written_is_no_cache() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_copy(dir.path());
    let blocker = dir.path().join("a file");
    std::fs::write(&blocker, "").unwrap();
    let cache = PanelCache::new(blocker.join("cache")).keeping_any_size();
    for _ in 0..2 {
        let loaded = Vit::load_cached(&model, Precision::F32, Some(&cache)).unwrap();
        assert!(!loaded.weights_from_cache());
        assert_eq!(tokens(&loaded), tokens(&Vit::load(&model).unwrap()));
    }
}

#[test]
fn the_command_line_keeps_big_models_only_where_told() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_copy(dir.path());
    let cache = dir.path().join("cache");
    let info = |extra: &[(&str, &Path)]| {
        let mut cmd = segattn_with(&["info", "--json"], &model, 32);
        cmd.env_remove("SEGATTN_CACHE").env("SEGATTN_CACHE_DIR", &cache);
        for (key, value) in extra {
            cmd.env(key, value);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    // A model this small is laid out faster than its file would be read.
    assert_eq!(info(&[])["weights_from_cache"], false);
    assert_eq!(info(&[])["weights_from_cache"], false);
    assert!(panel_files(&cache).is_empty(), "{}", s(&cache));
}
