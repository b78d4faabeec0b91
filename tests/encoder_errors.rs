//! Every way a checkpoint can be wrong gives an error naming the file and the
//! tensor, never a panic.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use segattn::model::Vit;

mod common;
use common::fixture;

fn load_error(path: &Path) -> String {
    let err = Vit::load(path).expect_err("loading should fail");
    let message = format!("{err:#}");
    assert!(!message.contains('\n'), "error should be one line: {message}");
    message
}

/// The dino_vit fixture with `edit` applied to its tensors, saved in `dir`.
fn edited(dir: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> PathBuf {
    let mut tensors = candle_core::safetensors::load(fixture("dino_vit/model.safetensors"), &Device::Cpu).unwrap();
    edit(&mut tensors);
    let path = dir.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    std::fs::copy(fixture("dino_vit/config.json"), dir.join("config.json")).unwrap();
    path
}

#[test]
fn truncated_file_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixture("dino_vit/model.safetensors")).unwrap();
    let path = dir.path().join("cut.safetensors");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let message = load_error(&path);
    assert!(message.contains("cut.safetensors") && message.contains("not a readable safetensors file"), "{message}");
}

#[test]
fn non_safetensors_file_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.safetensors");
    std::fs::write(&path, "these are not tensors\n").unwrap();
    let message = load_error(&path);
    assert!(message.contains("notes.safetensors") && message.contains("not a readable safetensors file"), "{message}");
}

#[test]
fn wrong_shape_names_the_tensor_and_both_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let name = "encoder.layer.1.intermediate.dense.weight";
    let path = edited(dir.path(), |t| {
        t.insert(name.into(), Tensor::zeros((64, 32), DType::F32, &Device::Cpu).unwrap());
    });
    let message = load_error(&path);
    assert!(message.contains(name) && message.contains("[64, 32]") && message.contains("[128, 32]"), "{message}");
}

#[test]
fn wrong_dtype_names_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let name = "encoder.layer.2.layernorm_after.bias";
    let path = edited(dir.path(), |t| {
        t.insert(name.into(), Tensor::zeros(32, DType::I64, &Device::Cpu).unwrap());
    });
    let message = load_error(&path);
    assert!(message.contains(name) && message.contains("I64") && message.contains("model.safetensors"), "{message}");
}

#[test]
fn missing_tensors_are_listed_up_to_ten() {
    let dir = tempfile::tempdir().unwrap();
    let path = edited(dir.path(), |t| t.retain(|name, _| !name.starts_with("encoder.layer.1.")));
    let message = load_error(&path);
    // Layer 1 has 16 tensors: ten are named, the rest counted.
    assert!(message.contains("16 tensor(s) missing"), "{message}");
    assert!(message.contains("encoder.layer.1.layernorm_before.weight"), "{message}");
    assert!(message.contains("(and 6 more)"), "{message}");
}

#[test]
fn missing_tensors_come_with_the_unexpected_ones() {
    let dir = tempfile::tempdir().unwrap();
    let path = edited(dir.path(), |t| {
        let w = t.remove("layernorm.weight").unwrap();
        t.insert("final_norm.weight".into(), w);
    });
    let message = load_error(&path);
    assert!(message.contains("missing: layernorm.weight; unexpected: final_norm.weight"), "{message}");
}

#[test]
fn file_without_a_patch_embedding_is_not_a_vit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other.safetensors");
    let tensors = HashMap::from([("decoder.weight".to_string(), Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap())]);
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let message = load_error(&path);
    assert!(message.contains("not a ViT checkpoint") && message.contains("decoder.weight"), "{message}");
}

#[test]
fn directory_paths_are_resolved_or_explained() {
    let dir = tempfile::tempdir().unwrap();
    let message = load_error(dir.path());
    assert!(message.contains("no model.safetensors"), "{message}");
    std::fs::write(dir.path().join("pytorch_model.bin"), b"pickle").unwrap();
    let message = load_error(dir.path());
    assert!(message.contains("pytorch_model.bin: not a readable PyTorch checkpoint"), "{message}");
    let pickle = std::fs::read(fixture("dino_vit_pickle/pytorch_model.bin")).unwrap();
    std::fs::write(dir.path().join("pytorch_model.bin"), &pickle[..pickle.len() / 2]).unwrap();
    let message = load_error(dir.path());
    assert!(message.contains("pytorch_model.bin: not a readable PyTorch checkpoint"), "{message}");
    assert!(load_error(&dir.path().join("absent.safetensors")).contains("no such file"));
}

#[test]
fn bad_config_json_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    edited(dir.path(), |_| {});
    std::fs::write(dir.path().join("config.json"), "{ not json").unwrap();
    let message = load_error(dir.path());
    assert!(message.contains("config.json") && message.contains("not a valid config.json"), "{message}");
}

#[test]
fn weights_too_large_to_compute_with_are_refused_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let name = "encoder.layer.0.layernorm_before.weight";
    let path = edited(dir.path(), |t| {
        t.insert(name.into(), Tensor::from_vec(vec![1e38f32; 32], 32, &Device::Cpu).unwrap());
    });
    let message = load_error(&path);
    assert!(message.contains(&format!("tensor `{name}` holds values as large as 1e38, beyond what f32")), "{message}");
}

#[test]
fn nan_or_infinite_weights_are_refused() {
    // A bias (loaded as a tensor), and weight matrices (read in place and
    // packed): the key of a q/k/v stack, and a plain layer.
    let cases = [
        ("encoder.layer.0.attention.attention.key.bias", vec![32]),
        ("encoder.layer.0.attention.attention.key.weight", vec![32, 32]),
        ("encoder.layer.1.intermediate.dense.weight", vec![128, 32]),
    ];
    for (name, shape) in cases {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let dir = tempfile::tempdir().unwrap();
            let path = edited(dir.path(), |t| {
                let mut values = vec![0.1f32; shape.iter().product()];
                values[7] = bad;
                t.insert(name.into(), Tensor::from_vec(values, shape.as_slice(), &Device::Cpu).unwrap());
            });
            let message = load_error(&path);
            assert!(
                message.contains(&format!("model.safetensors: tensor `{name}` holds NaN or infinite values")),
                "{name}: {message}"
            );
        }
    }
}

#[test]
fn config_json_must_agree_with_the_tensors() {
    let cases = [
        ("\"hidden_size\": 32", "\"hidden_size\": 64", "hidden_size is 64, but the tensors of"),
        ("\"patch_size\": 8", "\"patch_size\": 16", "patch_size is 16, but the tensors of"),
        ("\"intermediate_size\": 128", "\"intermediate_size\": 96", "intermediate_size is 96"),
        ("\"layer_norm_eps\": 1e-12", "\"layer_norm_eps\": -1", "layer_norm_eps must be a positive number, got -1"),
        ("\"layer_norm_eps\": 1e-12", "\"layer_norm_eps\": 0", "layer_norm_eps must be a positive number, got 0"),
    ];
    for (good, bad, expected) in cases {
        let dir = tempfile::tempdir().unwrap();
        edited(dir.path(), |_| {});
        let config = std::fs::read_to_string(fixture("dino_vit/config.json")).unwrap();
        assert!(config.contains(good), "{good}");
        std::fs::write(dir.path().join("config.json"), config.replace(good, bad)).unwrap();
        let message = load_error(dir.path());
        assert!(message.contains("config.json: ") && message.contains(expected), "{bad}: {message}");
    }
}
