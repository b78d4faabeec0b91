//! `train-head` on a generated dataset: colored shapes on textured
//! backgrounds, with a tiny random backbone.

use std::path::{Path, PathBuf};
use std::process::Output;

use image::{GrayImage, Luma, Rgb, RgbImage};

mod common;
use common::{fixture, s, segattn_with, stderr};

/// At 128 px the 8-px patches of the fixture backbone make a 16x16 grid.
fn segattn(args: &[&str], weights: &Path) -> Output {
    segattn_with(args, weights, 128).output().unwrap()
}

fn eval_iou(images: &Path, masks: &Path, head: &Path) -> f64 {
    let args = ["eval", "--images", s(images), "--masks", s(masks), "--head", "linear", "--head-weights", s(head)];
    let evaluated = segattn(&args, &fixture("dino_vit"));
    assert!(evaluated.status.success(), "{}", stderr(&evaluated));
    let text = String::from_utf8(evaluated.stdout).unwrap();
    text.lines().find(|l| l.starts_with("mean IoU")).unwrap()[9..].trim().parse().unwrap()
}

/// xorshift, so the dataset is the same on every run.
struct Noise(u32);

impl Noise {
    fn next(&mut self) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 17;
        self.0 ^= self.0 << 5;
        self.0
    }

    fn below(&mut self, n: u32) -> u32 {
        self.next() % n
    }
}

/// A 64x64 photo of a disc or square in a saturated colour on gray texture, and its mask.
fn shape(noise: &mut Noise) -> (RgbImage, GrayImage) {
    let colors = [[220, 30, 30], [30, 200, 40], [40, 60, 230], [230, 200, 20], [200, 40, 200]];
    let color = colors[noise.below(colors.len() as u32) as usize];
    let (cx, cy, r) = (20 + noise.below(24) as i32, 20 + noise.below(24) as i32, 10 + noise.below(8) as i32);
    let square = noise.below(2) == 0;
    let mut mask = GrayImage::new(64, 64);
    let mut photo = RgbImage::new(64, 64);
    for y in 0..64 {
        for x in 0..64 {
            let (dx, dy) = (x as i32 - cx, y as i32 - cy);
            let inside = if square { dx.abs() <= r && dy.abs() <= r } else { dx * dx + dy * dy <= r * r };
            let grain = noise.below(60) as u8;
            let stripes = if (x / 4 + y / 4) % 2 == 0 { 40 } else { 0 };
            photo.put_pixel(x, y, if inside { Rgb(color) } else { Rgb([80 + grain + stripes; 3]) });
            mask.put_pixel(x, y, Luma([if inside { 255 } else { 0 }]));
        }
    }
    (photo, mask)
}

fn dataset(dir: &Path, count: usize) -> (PathBuf, PathBuf) {
    let (images, masks) = (dir.join("images"), dir.join("masks"));
    std::fs::create_dir_all(&images).unwrap();
    std::fs::create_dir_all(&masks).unwrap();
    let mut noise = Noise(0x1234_5678);
    for i in 0..count {
        let (photo, mask) = shape(&mut noise);
        photo.save(images.join(format!("shape{i:02}.png"))).unwrap();
        mask.save(masks.join(format!("shape{i:02}.png"))).unwrap();
    }
    (images, masks)
}

fn val_iou(stdout: &[u8]) -> f64 {
    let text = String::from_utf8_lossy(stdout);
    let tail = text.split("val IoU ").nth(1).unwrap_or_else(|| panic!("no val IoU in {text}"));
    tail.split(|c: char| c == ',' || c.is_whitespace()).next().unwrap().parse().unwrap()
}

#[test]
fn trained_head_segments_shapes_far_better_than_untrained() {
    let dir = tempfile::tempdir().unwrap();
    let (images, masks) = dataset(dir.path(), 60);
    let head = dir.path().join("head.safetensors");
    let result = segattn(
        &[
            "train-head",
            "--images",
            s(&images),
            "--masks",
            s(&masks),
            "--out",
            s(&head),
            "--epochs",
            "40",
            "--lr",
            "0.03",
        ],
        &fixture("dino_vit"),
    );
    assert!(result.status.success(), "{}", stderr(&result));
    let trained = val_iou(&result.stdout);
    let epochs = stderr(&result).lines().filter(|l| l.starts_with("epoch ")).count();
    assert_eq!(epochs, 40);

    // The untrained head (zero weights and bias) calls every pixel
    // foreground: its IoU is the objects' share of the picture.
    let untrained = dir.path().join("untrained.safetensors");
    let zeros = std::collections::HashMap::from([
        (
            "head.weight".to_string(),
            candle_core::Tensor::zeros((1, 32), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap(),
        ),
        (
            "head.bias".to_string(),
            candle_core::Tensor::zeros(1, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap(),
        ),
    ]);
    candle_core::safetensors::save(&zeros, &untrained).unwrap();
    let (trained_pixels, untrained_pixels) = (eval_iou(&images, &masks, &head), eval_iou(&images, &masks, &untrained));
    println!(
        "val IoU (patches) {trained:.3}; mean pixel IoU over all 60: trained {trained_pixels:.3}, untrained {untrained_pixels:.3}"
    );
    assert!(trained >= 0.8, "trained head reached only {trained}");
    assert!(trained_pixels >= 0.75, "pixel IoU over the whole set only {trained_pixels}");
    assert!(trained_pixels > untrained_pixels + 0.4, "trained {trained_pixels} vs untrained {untrained_pixels}");
}

#[test]
fn a_head_refuses_another_backbone() {
    let dir = tempfile::tempdir().unwrap();
    let (images, masks) = dataset(dir.path(), 6);
    let head = dir.path().join("head.safetensors");
    let trained = segattn(
        &["train-head", "--images", s(&images), "--masks", s(&masks), "--out", s(&head), "--epochs", "2"],
        &fixture("dino_vit"),
    );
    assert!(trained.status.success(), "{}", stderr(&trained));
    // dinov2 has the same hidden size (32), so only the recorded backbone tells them apart.
    let out = dir.path().join("mask.png");
    let result = segattn(
        &["run", s(&images.join("shape00.png")), "--out", s(&out), "--head", "linear", "--head-weights", s(&head)],
        &fixture("dinov2"),
    );
    assert_eq!(result.status.code(), Some(2));
    assert!(stderr(&result).contains("this head was trained on another backbone"), "{}", stderr(&result));
    assert!(!out.exists());
}
