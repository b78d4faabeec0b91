//! segattn's own model, compiled into the binary, against PyTorch outputs of
//! the same file (`train/make_reference.py`), on the path `segattn run`
//! takes; and the command line using it when no model is named.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use candle_core::{Device, Tensor};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use segattn::head::{DecoderHead, LinearHead, SegmentationHead};
use segattn::model::{Capture, Keep, Precision, Vit, precision_is_available};
use segattn::preprocess;

mod common;
use common::{fixture, s, sample, stderr};

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("builtin/reference.safetensors"), &Device::Cpu).unwrap()
}

/// The reference's resized photo, normalized by segattn.
fn input(rgb: &Tensor) -> Tensor {
    let (h, w, _) = rgb.dims3().unwrap();
    let bytes: Vec<u8> = rgb.flatten_all().unwrap().to_vec1().unwrap();
    preprocess::normalize(&image::RgbImage::from_raw(w as u32, h as u32, bytes).unwrap()).unwrap()
}

#[test]
fn builtin_model_matches_pytorch() {
    let model = Vit::builtin().unwrap();
    let linear = LinearHead::bundled(&model).unwrap().expect("the built-in model carries its sub-patch head");
    let decoder = DecoderHead::bundled(&model).unwrap().expect("the built-in model carries its decoder");
    let expected = reference();
    let last = model.config().num_layers - 1;
    for name in ["cat", "astronaut"] {
        let x = input(&expected[&format!("{name}.rgb")]);
        let (_, _, h, w) = x.dims4().unwrap();
        // What `run` does: the stem's outputs kept for the decoder, fused attention throughout.
        let out = model.forward(&x, &decoder.capture(&model)).unwrap();
        let tokens_err = max_abs_diff(&out.tokens.squeeze(0).unwrap(), &expected[&format!("{name}.tokens")]);
        let soft_err = |head: &dyn SegmentationHead, key: &str| {
            let map = head.predict(&model, &out).unwrap().to_pixels(w as u32, h as u32);
            let soft = Tensor::from_vec(map.values, (h, w), &Device::Cpu).unwrap();
            max_abs_diff(&soft, &expected[&format!("{name}.{key}")])
        };
        let (decoder_err, linear_err) = (soft_err(&decoder, "decoder_soft"), soft_err(&linear, "soft"));
        // What `attn-map` does: the class token's row of the last layer.
        let looks = Capture::attention([last], Keep::ClsRow);
        let out = model.forward(&x, &looks).unwrap();
        let cls = out.attention(last).unwrap().squeeze(0).unwrap().squeeze(1).unwrap();
        let attention_err = max_abs_diff(&cls, &expected[&format!("{name}.cls_attention")]);
        println!(
            "{name}: max abs error tokens {tokens_err:.2e}, soft mask {decoder_err:.2e} (decoder) \
             {linear_err:.2e} (sub-patch head), attention {attention_err:.2e}"
        );
        assert!(tokens_err <= 1e-4, "{name}: tokens differ by {tokens_err}");
        assert!(decoder_err <= 1e-3, "{name}: the decoder's soft masks differ by {decoder_err}");
        assert!(linear_err <= 1e-3, "{name}: the sub-patch head's soft masks differ by {linear_err}");
        assert!(attention_err <= 1e-5, "{name}: class-token attention differs by {attention_err}");
    }
}

/// bfloat16 products, where the CPU has them, give the f32 path's masks to
/// an IoU of 0.99 and its attention to within a few percent; elsewhere
/// the model says it runs in f32.
#[test]
fn bfloat16_masks_agree_with_f32_masks() {
    let exact = Vit::builtin().unwrap();
    let fast = Vit::builtin_in(Precision::Bf16).unwrap();
    let bf16_here = precision_is_available(Precision::Bf16);
    assert_eq!(fast.precision(), if bf16_here { Precision::Bf16 } else { Precision::F32 });
    // The default head, as `run` uses it.
    let head = DecoderHead::bundled(&exact).unwrap().unwrap();
    for name in ["cat.jpg", "astronaut.jpg", "coffee.jpg", "rocket.jpg"] {
        let photo = image::open(sample(name)).unwrap();
        let x = preprocess::model_input(&photo, 224, 16).unwrap();
        let (_, _, h, w) = x.dims4().unwrap();
        let soft = |model: &Vit| {
            let out = model.forward(&x, &head.capture(model)).unwrap();
            head.predict(model, &out).unwrap().to_pixels(w as u32, h as u32).values
        };
        let looks = |model: &Vit| -> Vec<f32> {
            let last = model.config().num_layers - 1;
            let out = model.forward(&x, &Capture::attention([last], Keep::ClsRow)).unwrap();
            out.attention(last).unwrap().flatten_all().unwrap().to_vec1().unwrap()
        };
        let (p, q) = (looks(&exact), looks(&fast));
        let attention_diff = p.iter().zip(&q).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
        let attention_max = p.iter().copied().fold(0f32, f32::max);
        println!("{name}: class-token attention differs by at most {attention_diff:.2e} (largest {attention_max:.2e})");
        assert!(attention_diff <= 0.05 * attention_max, "{name}: attention differs by {attention_diff}");
        let (a, b) = (soft(&exact), soft(&fast));
        let largest = a.iter().zip(&b).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        // Flips happen where f32's probability is within `largest` of 0.5, so
        // how many there are depends on how steep the mask is there; the
        // masks' IoU is what a user sees. 0.04 is a logit error of 0.16 where
        // the mask is steepest (p = 0.5); the cat, the worst of the four,
        // differs by 0.025 with an IoU of 0.991.
        let both = a.iter().zip(&b).filter(|&(a, b)| *a >= 0.5 && *b >= 0.5).count();
        let either = a.iter().zip(&b).filter(|&(a, b)| *a >= 0.5 || *b >= 0.5).count();
        let mask_iou = both as f64 / either.max(1) as f64;
        println!("{name}: soft masks differ by at most {largest:.2e}; masks' IoU {mask_iou:.4}");
        if bf16_here {
            assert!(largest > 0.0, "{name}: the bfloat16 path gave f32's mask exactly: did it run?");
        }
        assert!(largest <= 0.04, "{name}: soft masks differ by {largest}");
        assert!(mask_iou >= 0.98, "{name}: bfloat16 and f32 masks have IoU {mask_iou}");
    }
}

#[test]
fn precision_bf16_runs_or_says_it_cannot() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cat_mask.png");
    let result = segattn(&["run", s(&sample("cat.jpg")), "--out", s(&out), "--precision", "bf16"]).output().unwrap();
    assert!(result.status.success(), "{}", stderr(&result));
    let warned = stderr(&result).contains("--precision bf16 runs in f32 here: ");
    assert_eq!(warned, !precision_is_available(Precision::Bf16), "{}", stderr(&result));
    let teacher = image::open(fixture("builtin/teacher/cat.png")).unwrap().to_luma8();
    assert!(iou(&image::open(&out).unwrap().to_luma8(), &teacher) >= 0.55);
}

/// A decoder that does not fit its encoder is a broken checkpoint: an error
/// naming the file and the tensor, and no mask.
#[test]
fn a_decoder_that_does_not_fit_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("weights/segattn-s16.safetensors")).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let narrow = vec![0u8; 2 * 32 * 10 * 3 * 3];
    let tensors = file.tensors().into_iter().map(|(name, view)| match name.as_str() {
        "decoder.up4.weight" => (name, TensorView::new(Dtype::F16, vec![32, 10, 3, 3], &narrow).unwrap()),
        _ => (name, view),
    });
    let broken = dir.path().join("broken.safetensors");
    std::fs::write(&broken, safetensors::serialize(tensors, header.metadata().clone()).unwrap()).unwrap();
    let out = dir.path().join("mask.png");
    let result = segattn(&["run", s(&sample("cat.jpg")), "--out", s(&out), "--weights", s(&broken)]).output().unwrap();
    assert_eq!(result.status.code(), Some(2));
    let message = stderr(&result);
    assert!(message.contains("broken.safetensors: `decoder.up4.weight` has shape [32, 10, 3, 3]"), "{message}");
    assert!(!out.exists());
}

/// segattn-s16's file carries its own ncut threshold (train/ncut_tau): its
/// keys are more alike than DINO's, and at TokenCut's 0.2 nearly every patch
/// links to every other and the cut misses the cat.
#[test]
fn ncut_takes_the_models_own_tau() {
    let dir = tempfile::tempdir().unwrap();
    let cut = |tau: Option<&str>| {
        let out = dir.path().join(format!("cat_ncut_{}.png", tau.unwrap_or("default")));
        let photo = sample("cat.jpg");
        let mut args = vec!["run", s(&photo), "--out", s(&out), "--head", "ncut"];
        if let Some(tau) = tau {
            args.extend(["--tau", tau]);
        }
        let result = segattn(&args).output().unwrap();
        assert!(result.status.success(), "{}", stderr(&result));
        image::open(&out).unwrap().to_luma8()
    };
    let teacher = image::open(fixture("builtin/teacher/cat.png")).unwrap().to_luma8();
    let (own, given, tokencut) = (cut(None), cut(Some("0.9")), cut(Some("0.2")));
    assert_eq!(own, given, "the default is the file's segattn_ncut_tau, 0.9");
    let (own, tokencut) = (iou(&own, &teacher), iou(&tokencut, &teacher));
    println!("cat, ncut: IoU with the teacher's mask {own:.3} at the model's tau, {tokencut:.3} at 0.2");
    assert!(own >= 0.8, "{own}");
    assert!(tokencut < 0.5, "{tokencut}: at 0.2 the cut should miss, or this test proves nothing");
}

/// A threshold that is not a similarity is a broken checkpoint, not a mask.
#[test]
fn a_broken_ncut_tau_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("weights/segattn-s16.safetensors")).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let mut metadata = header.metadata().clone().unwrap();
    metadata.insert("segattn_ncut_tau".into(), "1.5".into());
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let broken = dir.path().join("broken.safetensors");
    std::fs::write(&broken, safetensors::serialize(file.tensors(), Some(metadata)).unwrap()).unwrap();
    let out = dir.path().join("mask.png");
    let result = segattn(&["run", s(&sample("cat.jpg")), "--out", s(&out), "--weights", s(&broken)]).output().unwrap();
    assert_eq!(result.status.code(), Some(2));
    let message = stderr(&result);
    assert!(
        message.contains("broken.safetensors: metadata segattn_ncut_tau is \"1.5\", not a similarity"),
        "{message}"
    );
    assert!(!out.exists());
}

/// `segattn` with no model named anywhere.
fn segattn(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_segattn"));
    cmd.args(args).env_remove("SEGATTN_WEIGHTS").env_remove("SEGATTN_MODEL");
    cmd
}

fn iou(a: &image::GrayImage, b: &image::GrayImage) -> f64 {
    assert_eq!(a.dimensions(), b.dimensions());
    let (mut inter, mut union) = (0u64, 0u64);
    for (p, q) in a.pixels().zip(b.pixels()) {
        let (x, y) = (p[0] >= 128, q[0] >= 128);
        inter += (x && y) as u64;
        union += (x || y) as u64;
    }
    inter as f64 / union.max(1) as f64
}

#[test]
fn run_with_no_model_finds_the_cat() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cat_mask.png");
    let result = segattn(&["run", s(&sample("cat.jpg")), "--out", s(&out)]).output().unwrap();
    assert!(result.status.success(), "{}", stderr(&result));
    let mask = image::open(&out).unwrap().to_luma8();
    assert_eq!(mask.dimensions(), (451, 300), "mask at the photo's size");
    // The IS-Net teacher's mask of the same photo (tests/fixtures/builtin/teacher).
    let teacher = image::open(fixture("builtin/teacher/cat.png")).unwrap().to_luma8();
    let score = iou(&mask, &teacher);
    println!("cat: IoU with the teacher's mask {score:.3}");
    assert!(score >= 0.55, "the mask does not cover the cat: IoU {score:.3} with the teacher's");
}

#[test]
fn eval_scores_the_builtin_model_and_other_masks() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("scores.json");
    let teacher = fixture("builtin/teacher");
    let result =
        segattn(&["eval", "--images", s(&sample("")), "--masks", s(&teacher), "--json", s(&report)]).output().unwrap();
    assert!(result.status.success(), "{}", stderr(&result));
    let scores: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    println!("{scores}");
    assert_eq!(scores["head"], "decoder", "the built-in model's own head is the default");
    assert_eq!(scores["images"], 4);
    assert!(scores["mean_iou"].as_f64().unwrap() >= 0.55, "{scores}");
    // Where the model looks: most of the class token's attention on the object.
    assert!(scores["attention_inside"].as_f64().unwrap() >= 0.6, "{scores}");

    // The same scoring of another tool's masks: the teacher against itself.
    let result = segattn(&["eval", "--images", s(&sample("")), "--masks", s(&teacher)])
        .args(["--predictions", s(&teacher), "--json", s(&report)])
        .output()
        .unwrap();
    assert!(result.status.success(), "{}", stderr(&result));
    let scores: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(scores["mean_iou"], 1.0, "{scores}");
    assert!(scores["attention_inside"].is_null());
}

#[test]
fn info_and_list_name_the_builtin_model() {
    let info = segattn(&["info", "--json"]).output().unwrap();
    assert!(info.status.success(), "{}", stderr(&info));
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["weights"], "segattn-s16 (built in)");
    assert_eq!(info["trained_head"], "linear, 4x4 cells per patch");
    assert_eq!(info["trained_decoder"], "skips from the stem, logits at 1/4 of the input");
    assert_eq!(info["input_short_side"], 224);
    assert_eq!(info["ncut_tau"], 0.9);
    assert_eq!(info["heads"], 3);
    assert_eq!(info["hidden_size"], 192);

    let home = tempfile::tempdir().unwrap();
    let list = segattn(&["list", "--json"]).env("HF_HOME", home.path()).env_remove("HF_HUB_CACHE").output().unwrap();
    assert!(list.status.success(), "{}", stderr(&list));
    let list: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(list["default"], "segattn-s16");
    assert_eq!(list["models"][0]["name"], "segattn-s16");
    assert_eq!(list["models"][0]["builtin"], true);

    // Named explicitly, it is the same model; it has nothing to fetch.
    let named = segattn(&["info", "--json", "--model", "segattn-s16"]).output().unwrap();
    assert!(named.status.success(), "{}", stderr(&named));
    let fetch = segattn(&["fetch", "segattn-s16"]).env("HF_HUB_OFFLINE", "1").output().unwrap();
    assert!(fetch.status.success(), "{}", stderr(&fetch));
    assert!(stderr(&fetch).contains("built into segattn"), "{}", stderr(&fetch));
}

/// The built-in model is no file: an output that happens to carry its
/// display name is the user's to replace, not "one of this command's inputs".
#[test]
fn the_builtin_model_protects_no_file_of_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let name = segattn::model::builtin::DISPLAY_NAME;
    std::fs::write(dir.path().join(name), b"an earlier output").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_segattn"))
        .current_dir(dir.path())
        .args(["run", s(&sample("cat.jpg")), "--out", name])
        .env_remove("SEGATTN_WEIGHTS")
        .env_remove("SEGATTN_MODEL")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(std::fs::read(dir.path().join(name)).unwrap().starts_with(b"\x89PNG"));
}
