//! The encoder against the PyTorch / transformers reference outputs stored in
//! `tests/fixtures` (made by `tests/fixtures/make_fixtures.py`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use segattn::model::interpolate::resample_grid;
use segattn::model::{Capture, Keep, PosInterpolation, Vit};

mod common;
use common::fixture;

const TOLERANCE: f32 = 1e-4;

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// Runs every reference input through `model`; returns the largest error on
/// hidden states and on attentions.
fn compare(model: &Vit, reference: &Path) -> (f32, f32) {
    let expected = candle_core::safetensors::load(reference, &Device::Cpu).unwrap();
    let all_layers = Capture::attention(0..model.config().num_layers, Keep::Full);
    let (mut hidden_err, mut attn_err) = (0f32, 0f32);
    let mut cases = 0;
    while let Some(input) = expected.get(&format!("input_{cases}")) {
        let out = model.forward(input, &all_layers).unwrap();
        hidden_err = hidden_err.max(max_abs_diff(&out.tokens, &expected[&format!("last_hidden_state_{cases}")]));
        let attentions: Vec<Tensor> = out.attentions.into_iter().map(|(_, a)| a).collect();
        let attentions = Tensor::cat(&attentions, 0).unwrap();
        attn_err = attn_err.max(max_abs_diff(&attentions, &expected[&format!("attentions_{cases}")]));
        cases += 1;
    }
    assert_eq!(cases, 2, "each fixture has two input sizes");
    (hidden_err, attn_err)
}

fn assert_parity(name: &str, model: &Vit, reference: &Path) {
    let (hidden, attention) = compare(model, reference);
    println!("{name}: max abs error hidden {hidden:.2e}, attention {attention:.2e}");
    assert!(hidden <= TOLERANCE, "{name}: hidden states differ by {hidden}");
    assert!(attention <= TOLERANCE, "{name}: attentions differ by {attention}");
}

#[test]
fn dino_vit_matches_transformers() {
    let model = Vit::load(&fixture("dino_vit")).unwrap();
    assert_eq!(model.config().pos_interpolation, PosInterpolation::Size);
    assert_eq!(model.config().num_registers, 0);
    assert!(!model.config().layer_scale);
    assert_parity("dino_vit", &model, &fixture("dino_vit/reference.safetensors"));
}

#[test]
fn pytorch_pickle_checkpoint_matches_transformers() {
    // dino_vit's weights saved as pytorch_model.bin, as older Hub repos publish them.
    let model = Vit::load(&fixture("dino_vit_pickle")).unwrap();
    assert!(model.files().weights.ends_with("pytorch_model.bin"));
    assert_parity("dino_vit_pickle", &model, &fixture("dino_vit/reference.safetensors"));
}

#[test]
fn dinov2_matches_transformers() {
    let model = Vit::load(&fixture("dinov2")).unwrap();
    assert!(model.config().layer_scale);
    assert_eq!(model.config().patch_size, 14);
    assert_parity("dinov2", &model, &fixture("dinov2/reference.safetensors"));
}

#[test]
fn dinov2_with_registers_matches_transformers() {
    let model = Vit::load(&fixture("dinov2_reg")).unwrap();
    assert_eq!(model.config().num_registers, 4);
    assert_eq!(model.config().pos_interpolation, PosInterpolation::SizeAntialias);
    assert_parity("dinov2_reg", &model, &fixture("dinov2_reg/reference.safetensors"));
}

#[test]
fn torch_hub_layout_in_float16_matches_transformers() {
    let model = Vit::load(&fixture("dinov2_reg_hub.safetensors")).unwrap();
    let config = model.config();
    // No config.json: one 64-dim head for hidden 64, MLP ratio 2 read off shapes.
    assert_eq!((config.num_heads, config.mlp_hidden_size, config.num_registers), (1, 128, 2));
    assert_parity("dinov2_reg_hub", &model, &fixture("dinov2_reg_hub.reference.safetensors"));
}

/// The register-tile attention runs heads of 64 dimensions where the CPU has
/// AVX2 + FMA or AVX-512, unless `SEGATTN_KERNELS=portable` rules them out.
fn tiles_expected() -> bool {
    let portable = std::env::var("SEGATTN_KERNELS").is_ok_and(|k| k == "portable");
    #[cfg(target_arch = "x86_64")]
    let simd = std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma");
    #[cfg(not(target_arch = "x86_64"))]
    let simd = false;
    simd && !portable
}

/// The path `run` and `attn-map` take, on models with 64-dimension heads
/// (every published DINO and DINOv2 size): nothing captured, or only the
/// class token's row, so attention runs fused, never as full matrices. The
/// token counts (43, 105; 25, 47) are multiples of no tile size. CI runs
/// this file again with `SEGATTN_KERNELS=avx2` and `=portable`.
#[test]
fn production_path_matches_transformers_with_64_dimension_heads() {
    for (name, registers) in [("vit_h64", 0), ("dinov2_reg_h64", 4)] {
        let model = Vit::load(&fixture(name)).unwrap();
        let config = model.config();
        assert_eq!((config.hidden_size / config.num_heads, config.num_heads, config.num_registers), (64, 2, registers));
        let (linear_kernel, attention_kernel) = model.kernel_names();
        println!("{name}: linear {linear_kernel}; attention {attention_kernel}");
        assert_eq!(attention_kernel.starts_with("register tiles"), tiles_expected(), "{attention_kernel}");
        let reference =
            candle_core::safetensors::load(fixture(name).join("reference.safetensors"), &Device::Cpu).unwrap();
        let every_cls_row = Capture::attention(0..config.num_layers, Keep::ClsRow);
        for case in 0..2 {
            let input = &reference[&format!("input_{case}")];
            let tokens = &reference[&format!("last_hidden_state_{case}")];
            let plain = model.forward(input, &Capture::default()).unwrap();
            assert!(plain.attentions.is_empty());
            let with_rows = model.forward(input, &every_cls_row).unwrap();
            let rows: Vec<Tensor> = with_rows.attentions.iter().map(|(_, a)| a.squeeze(2).unwrap()).collect();
            let errors = [
                max_abs_diff(&plain.tokens, tokens),
                max_abs_diff(&with_rows.tokens, tokens),
                max_abs_diff(&Tensor::cat(&rows, 0).unwrap(), &reference[&format!("cls_attentions_{case}")]),
            ];
            println!(
                "{name} case {case}, {} tokens: max abs error tokens {:.1e}, tokens with rows {:.1e}, rows {:.1e}",
                tokens.dim(1).unwrap(),
                errors[0],
                errors[1],
                errors[2]
            );
            assert!(errors.iter().all(|&e| e <= TOLERANCE), "{name} case {case}: {errors:?}");
        }
    }
}

/// Writes `tensors` (renamed by `rename`) with `config.json` copied from `source`.
fn rewrite(source: &str, rename: impl Fn(&str) -> String, dir: &Path) -> PathBuf {
    let tensors = candle_core::safetensors::load(fixture(source).join("model.safetensors"), &Device::Cpu).unwrap();
    let renamed: HashMap<String, Tensor> = tensors.into_iter().map(|(k, v)| (rename(&k), v)).collect();
    let out = dir.join(source);
    std::fs::create_dir_all(&out).unwrap();
    candle_core::safetensors::save(&renamed, out.join("model.safetensors")).unwrap();
    std::fs::copy(fixture(source).join("config.json"), out.join("config.json")).unwrap();
    out
}

/// The names transformers >= 5 gives the same modules (from its modeling_vit.py
/// and modeling_dinov2.py): q/k/v/o projections everywhere; ViT blocks under
/// `layers.N` with their MLP as `mlp.fc1` / `mlp.fc2`.
fn transformers_v5_name(name: &str, vit: bool) -> String {
    let name = name
        .replace("attention.attention.query", "attention.q_proj")
        .replace("attention.attention.key", "attention.k_proj")
        .replace("attention.attention.value", "attention.v_proj")
        .replace("attention.output.dense", "attention.o_proj");
    if !vit {
        return name;
    }
    name.replace("encoder.layer.", "layers.")
        .replace("intermediate.dense", "mlp.fc1")
        .replace("output.dense", "mlp.fc2")
}

#[test]
fn transformers_v5_names_load_to_the_same_model() {
    let dir = tempfile::tempdir().unwrap();
    for (source, vit) in [("dino_vit", true), ("dinov2", false)] {
        let path = rewrite(source, |n| transformers_v5_name(n, vit), dir.path());
        let model = Vit::load(&path).unwrap();
        assert_parity(&format!("{source} (v5 names)"), &model, &fixture(source).join("reference.safetensors"));
    }
}

#[test]
fn prefixed_names_load_to_the_same_model() {
    let dir = tempfile::tempdir().unwrap();
    let path = rewrite("dinov2_reg", |n| format!("dinov2.{n}"), dir.path());
    let model = Vit::load(&path).unwrap();
    assert_parity("dinov2_reg (dinov2. prefix)", &model, &fixture("dinov2_reg/reference.safetensors"));
}

#[test]
fn bfloat16_weights_are_converted_on_load() {
    let dir = tempfile::tempdir().unwrap();
    let tensors = candle_core::safetensors::load(fixture("dino_vit/model.safetensors"), &Device::Cpu).unwrap();
    let bf16: HashMap<String, Tensor> =
        tensors.into_iter().map(|(k, v)| (k, v.to_dtype(DType::BF16).unwrap())).collect();
    let path = dir.path().join("bf16.safetensors");
    candle_core::safetensors::save(&bf16, &path).unwrap();
    std::fs::copy(fixture("dino_vit/config.json"), dir.path().join("config.json")).unwrap();
    let model = Vit::load(&path).unwrap();
    let (hidden, attention) = compare(&model, &fixture("dino_vit/reference.safetensors"));
    // bf16 keeps 8 bits of mantissa: close to the f32 reference, not equal.
    assert!(hidden < 0.1 && attention < 0.05, "bf16 drifted: hidden {hidden}, attention {attention}");
}

#[test]
fn bicubic_resampling_matches_torch_interpolate() {
    let cases = candle_core::safetensors::load(fixture("interp.safetensors"), &Device::Cpu).unwrap();
    let grid = cases["grid"].squeeze(0).unwrap();
    for (rows, cols) in [(3, 7), (8, 6)] {
        for (key, mode) in [
            ("size", PosInterpolation::Size),
            ("antialias", PosInterpolation::SizeAntialias),
            ("offset", PosInterpolation::ScaleOffset(0.1)),
        ] {
            let ours = resample_grid(&grid, rows, cols, mode).unwrap();
            let expected = cases[&format!("{key}_{rows}x{cols}")].squeeze(0).unwrap();
            let err = max_abs_diff(&ours, &expected);
            assert!(err < 1e-5, "{key} {rows}x{cols}: {err}");
        }
    }
}

#[test]
fn capture_keeps_only_what_was_asked() {
    let model = Vit::load(&fixture("dinov2_reg")).unwrap();
    let reference = candle_core::safetensors::load(fixture("dinov2_reg/reference.safetensors"), &Device::Cpu).unwrap();
    let input = &reference["input_0"];
    let plain = model.forward(input, &Capture::default()).unwrap();
    assert!(plain.attentions.is_empty() && plain.qkv.is_none());

    let last = model.resolve_layer(-1).unwrap();
    let out = model
        .forward(input, &Capture::attention([1], Keep::Full).and_attention([0], Keep::ClsRow).and_qkv(last))
        .unwrap();
    assert_eq!(out.attentions.len(), 2);
    let cls_row = out.attention(0).unwrap();
    assert_eq!(cls_row.dims()[2], 1, "only the class token's row");
    let expected_cls = reference["attentions_0"].get(0).unwrap().narrow(1, 0, 1).unwrap();
    assert!(max_abs_diff(&cls_row.squeeze(0).unwrap(), &expected_cls) <= TOLERANCE);
    let expected_layer1 = reference["attentions_0"].get(1).unwrap();
    assert!(max_abs_diff(&out.attention(1).unwrap().squeeze(0).unwrap(), &expected_layer1) <= TOLERANCE);
    let qkv = out.qkv.unwrap();
    let tokens = out.num_prefix_tokens + out.grid.len();
    assert_eq!((qkv.layer, qkv.keys.dims()), (2, &[1, 4, tokens, 8][..]));
    assert_eq!((out.grid.rows, out.grid.cols, out.num_prefix_tokens), (3, 5, 5));
    // The captured run (full matrices) and the plain one (fused attention)
    // compute the same tokens up to float rounding.
    assert!(max_abs_diff(&plain.tokens, &out.tokens) < 1e-5);
    assert!(model.resolve_layer(3).is_err() && model.resolve_layer(-4).is_err());
}

#[test]
fn fused_attention_for_many_tokens_equals_the_full_matrix() {
    // 36 x 40 patches = 1440 tokens, many blocks of queries and of keys:
    // layers whose matrix is not kept run fused, one block at a time.
    let model = Vit::load(&fixture("dino_vit")).unwrap();
    let pixels = Tensor::randn(0f32, 1.0, (1, 3, 288, 320), &Device::Cpu).unwrap();
    let last = model.resolve_layer(-1).unwrap();
    let full = model.forward(&pixels, &Capture::attention(0..3, Keep::Full)).unwrap();
    let fused = model.forward(&pixels, &Capture::attention([last], Keep::ClsRow)).unwrap();
    assert!(max_abs_diff(&full.tokens, &fused.tokens) < 1e-5);
    let full_cls = full.attention(last).unwrap().narrow(2, 0, 1).unwrap();
    assert!(max_abs_diff(&full_cls, fused.attention(last).unwrap()) < 1e-6);
}
