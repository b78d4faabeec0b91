//! The segmentation heads and `eval` from the command line.

use std::collections::HashMap;
use std::path::Path;
use std::process::Output;

use candle_core::{DType, Device, Tensor};

mod common;
use common::{fixture, s, sample, segattn_with, stderr};

fn segattn(args: &[&str], weights: &Path) -> Output {
    segattn_with(args, weights, 64).output().unwrap()
}

/// Exit code 2 with `message` on standard error.
fn assert_usage_error(result: &Output, message: &str) {
    assert_eq!(result.status.code(), Some(2));
    assert!(stderr(result).contains(message), "{}", stderr(result));
}

#[test]
fn ncut_head_with_refinement_writes_a_mask() {
    let dir = tempfile::tempdir().unwrap();
    let coffee = sample("coffee.jpg");
    for (name, extra) in [("plain.png", None), ("refined.png", Some("--refine"))] {
        let out = dir.path().join(name);
        let mut args = vec!["run", s(&coffee), "--out", s(&out), "--head", "ncut", "--tau", "0.1"];
        args.extend(extra);
        let result = segattn(&args, &fixture("dinov2_reg"));
        assert!(result.status.success(), "{}", stderr(&result));
        let mask = image::open(&out).unwrap().into_luma8();
        assert_eq!(mask.dimensions(), (600, 400));
        let white = mask.pixels().filter(|p| p[0] == 255).count();
        assert!(white > 0 && white < 600 * 400, "the cut keeps one side: {white} pixels");
    }
}

fn head_file(path: &Path, hidden: usize, bias: f32) {
    let tensors = HashMap::from([
        ("head.weight".to_string(), Tensor::zeros((1, hidden), DType::F32, &Device::Cpu).unwrap()),
        ("head.bias".to_string(), Tensor::new(&[bias], &Device::Cpu).unwrap()),
    ]);
    candle_core::safetensors::save(&tensors, path).unwrap();
}

#[test]
fn linear_head_reads_a_side_file_or_the_backbone_file() {
    let dir = tempfile::tempdir().unwrap();
    let cat = sample("cat.jpg");
    let out = dir.path().join("mask.png");
    // Zero weights: the bias alone decides, everywhere.
    for (bias, expected) in [(5.0, 255u8), (-5.0, 0u8)] {
        let head = dir.path().join("head.safetensors");
        head_file(&head, 32, bias);
        let result = segattn(
            &["run", s(&cat), "--out", s(&out), "--head", "linear", "--head-weights", s(&head)],
            &fixture("dino_vit"),
        );
        assert!(result.status.success(), "{}", stderr(&result));
        assert!(image::open(&out).unwrap().into_luma8().pixels().all(|p| p[0] == expected), "bias {bias}");
    }

    // The same head stored inside the backbone's checkpoint.
    let combined = dir.path().join("combined");
    std::fs::create_dir(&combined).unwrap();
    let mut tensors = candle_core::safetensors::load(fixture("dino_vit/model.safetensors"), &Device::Cpu).unwrap();
    tensors.insert("head.weight".into(), Tensor::zeros((1, 32), DType::F32, &Device::Cpu).unwrap());
    tensors.insert("head.bias".into(), Tensor::new(&[5f32], &Device::Cpu).unwrap());
    candle_core::safetensors::save(&tensors, combined.join("model.safetensors")).unwrap();
    std::fs::copy(fixture("dino_vit/config.json"), combined.join("config.json")).unwrap();
    let result = segattn(&["run", s(&cat), "--out", s(&out), "--head", "linear"], &combined);
    assert!(result.status.success(), "{}", stderr(&result));
    assert!(image::open(&out).unwrap().into_luma8().pixels().all(|p| p[0] == 255));
}

#[test]
fn linear_head_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("mask.png");
    let head = dir.path().join("wide.safetensors");
    head_file(&head, 64, 0.0);
    let cat = sample("cat.jpg");
    let result = segattn(
        &["run", s(&cat), "--out", s(&out), "--head", "linear", "--head-weights", s(&head)],
        &fixture("dino_vit"),
    );
    assert_usage_error(
        &result,
        "wide.safetensors: `head.weight` has shape [1, 64], expected [s², 32] for this backbone",
    );
    // A backbone without a head.
    let result = segattn(&["run", s(&cat), "--out", s(&out), "--head", "linear"], &fixture("dino_vit"));
    assert_usage_error(&result, "model.safetensors: no trained head (head.weight, head.bias) in the model");
    // A side file for a head that reads none, or a decoder the backbone lacks.
    let result = segattn(
        &["run", s(&cat), "--out", s(&out), "--head", "attn", "--head-weights", s(&head)],
        &fixture("dino_vit"),
    );
    assert_usage_error(&result, "--head-weights is a linear head's file: it does not go with --head attn");
    let result = segattn(&["run", s(&cat), "--out", s(&out), "--head", "decoder"], &fixture("dino_vit"));
    assert_usage_error(&result, "model.safetensors: no trained decoder (decoder.*) in the model");
    assert!(!out.exists());
}

#[test]
fn eval_scores_pairs_and_lists_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let (images, masks) = (dir.path().join("images"), dir.path().join("masks"));
    std::fs::create_dir(&images).unwrap();
    std::fs::create_dir(&masks).unwrap();
    for name in ["cat", "coffee", "rocket"] {
        std::fs::copy(sample(&format!("{name}.jpg")), images.join(format!("{name}.jpg"))).unwrap();
    }
    std::fs::write(images.join("broken.jpg"), b"not a photo").unwrap();
    std::fs::copy(sample("astronaut.jpg"), images.join("unmatched.jpg")).unwrap();
    // Ground truth: the attn head's own masks, so the attn head must score perfectly.
    for name in ["cat", "coffee", "rocket"] {
        let out = masks.join(format!("{name}.png"));
        let made = segattn(&["run", s(&images.join(format!("{name}.jpg"))), "--out", s(&out)], &fixture("dino_vit"));
        assert!(made.status.success(), "{}", stderr(&made));
    }
    std::fs::copy(masks.join("cat.png"), masks.join("broken.png")).unwrap();

    let report = dir.path().join("report.json");
    let result = segattn(
        &["eval", "--images", s(&images), "--masks", s(&masks), "--json", s(&report), "--jobs", "2"],
        &fixture("dino_vit"),
    );
    // One unreadable pair: reported, exit 1, the rest still scored.
    assert_eq!(result.status.code(), Some(1), "{}", stderr(&result));
    let err = stderr(&result);
    assert!(err.contains("unmatched.jpg: no mask named unmatched.*"), "{err}");
    assert!(err.contains("broken.jpg: not a supported image"), "{err}");
    let stdout = String::from_utf8(result.stdout).unwrap();
    assert!(stdout.contains("mean IoU  1.0000") && stdout.contains("max F     1.0000"), "{stdout}");

    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(report["images"], 3);
    for field in ["mean_iou", "max_f", "mae"] {
        assert!(report[field].is_f64(), "{field}");
    }
    assert_eq!(report["mean_iou"], 1.0);
    let rows = report["per_image"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["cat", "coffee", "rocket"]);
    assert!(rows.iter().all(|r| r["iou"] == 1.0 && r["mae"].is_f64() && r["max_f"] == 1.0));
    assert_eq!(report["missing"].as_array().unwrap().len(), 1);
    assert_eq!(report["unreadable"].as_array().unwrap().len(), 1);

    // Another head on the same data scores, differently, with the same fields.
    let result =
        segattn(&["eval", "--images", s(&images), "--masks", s(&masks), "--head", "ncut"], &fixture("dino_vit"));
    assert_eq!(result.status.code(), Some(1));
    assert!(String::from_utf8(result.stdout).unwrap().contains("images    3"));
}

/// Found by fuzzing head files: finite weights large enough that a logit
/// overflows to infinity, and the map, upsampled, to NaN. That photo is an
/// error, not a mask of nothing.
#[test]
fn a_head_that_overflows_fails_the_photo() {
    let dir = tempfile::tempdir().unwrap();
    let head = dir.path().join("head.safetensors");
    let weight: Vec<f32> = (0..32).map(|i| if i % 2 == 0 { 3e38 } else { -3e38 }).collect();
    let tensors = HashMap::from([
        ("head.weight".to_string(), Tensor::from_vec(weight, (1, 32), &Device::Cpu).unwrap()),
        ("head.bias".to_string(), Tensor::new(&[0f32], &Device::Cpu).unwrap()),
    ]);
    candle_core::safetensors::save(&tensors, &head).unwrap();
    let out = dir.path().join("mask.png");
    let cat = sample("cat.jpg");
    let args = ["run", s(&cat), "--out", s(&out), "--head", "linear", "--head-weights", s(&head)];
    let result = segattn(&args, &fixture("dino_vit"));
    assert_eq!(result.status.code(), Some(1), "{}", stderr(&result));
    assert!(stderr(&result).contains("holds NaN or infinite values"), "{}", stderr(&result));
    assert!(!out.exists());
}
