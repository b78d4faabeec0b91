//! The built binary, driven as a shell script would: outputs, exit codes,
//! and bad input.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use image::{DynamicImage, ImageFormat, Rgb, RgbImage};

mod common;
use common::{s, sample, segattn_with, stderr};

fn weights() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dino_vit")
}

/// `segattn ARGS --weights fixture --size 64`, with piped stdio.
fn segattn(args: &[&str]) -> Command {
    segattn_with(args, &weights(), 64)
}

fn run(args: &[&str]) -> Output {
    segattn(args).output().unwrap()
}

fn photo(width: u32, height: u32) -> RgbImage {
    RgbImage::from_fn(width, height, |x, y| Rgb([(x * 7) as u8, (y * 5) as u8, ((x + y) * 3) as u8]))
}

fn save(image: &DynamicImage, path: &Path, format: ImageFormat) {
    image.save_with_format(path, format).unwrap();
}

#[test]
fn run_writes_a_binary_mask_at_the_input_size_with_json() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("mask.png");
    let overlay = dir.path().join("overlay.png");
    let cutout = dir.path().join("cutout.png");
    let result = run(&[
        "run",
        s(&sample("cat.jpg")),
        "--out",
        s(&out),
        "--overlay",
        s(&overlay),
        "--cutout",
        s(&cutout),
        "--json",
    ]);
    assert!(result.status.success(), "{}", stderr(&result));
    let mask = image::open(&out).unwrap();
    assert_eq!((mask.width(), mask.height()), (451, 300));
    let mask = mask.as_luma8().expect("8-bit gray mask");
    assert!(mask.pixels().all(|p| p[0] == 0 || p[0] == 255));
    assert_eq!(image::open(&overlay).unwrap().color(), image::ColorType::Rgb8);
    let cut = image::open(&cutout).unwrap();
    assert_eq!((cut.color(), cut.width(), cut.height()), (image::ColorType::Rgba8, 451, 300));

    let line = String::from_utf8(result.stdout).unwrap();
    let record: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(record["width"], 451);
    assert_eq!(record["height"], 300);
    assert_eq!(record["outputs"]["mask"], s(&out));
    let area = record["mask_area"].as_f64().unwrap();
    let white = mask.pixels().filter(|p| p[0] == 255).count() as f64 / (451.0 * 300.0);
    assert!((area - white).abs() < 1e-9);
    assert!(record["ms"].as_f64().unwrap() > 0.0);
}

#[test]
fn soft_masks_use_the_full_range() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("soft.png");
    assert!(run(&["run", s(&sample("coffee.jpg")), "--out", s(&out), "--soft"]).status.success());
    let mask = image::open(&out).unwrap().into_luma8();
    assert!(mask.pixels().any(|p| p[0] != 0 && p[0] != 255), "a soft mask has intermediate values");
}

fn assert_rejected(bytes: &[u8], name: &str, reason: &str) {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join(name);
    std::fs::write(&input, bytes).unwrap();
    let out = dir.path().join("out.png");
    let result = run(&["run", s(&input), "--out", s(&out)]);
    assert_eq!(result.status.code(), Some(1), "{name}");
    let err = stderr(&result);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.starts_with(&format!("segattn: {}: ", input.display())) && err.contains(reason), "{name}: {err}");
    assert!(!out.exists(), "{name}: nothing written");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(leftovers.len(), 1, "{name}: no temporary files left");
}

fn encoded(format: ImageFormat) -> Vec<u8> {
    let mut bytes = std::io::Cursor::new(Vec::new());
    DynamicImage::ImageRgb8(photo(64, 48)).write_to(&mut bytes, format).unwrap();
    bytes.into_inner()
}

#[test]
fn zero_byte_file_is_rejected() {
    assert_rejected(b"", "empty.jpg", "empty file");
}

#[test]
fn truncated_jpeg_and_png_are_rejected() {
    let jpeg = encoded(ImageFormat::Jpeg);
    assert_rejected(&jpeg[..jpeg.len() / 3], "cut.jpg", "cannot decode image");
    let png = encoded(ImageFormat::Png);
    assert_rejected(&png[..png.len() / 2], "cut.png", "cannot decode image");
}

#[test]
fn text_named_jpg_is_rejected() {
    assert_rejected(b"hello, I am not a photo\n", "notes.jpg", "not a supported image");
}

/// A small PNG whose header claims 100000 x 100000 pixels (a decompression bomb's shape).
fn huge_png_header() -> Vec<u8> {
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], data: &[u8]| {
        let body = [kind, data].concat();
        png.extend((data.len() as u32).to_be_bytes());
        png.extend(&body);
        png.extend(crc32(&body).to_be_bytes());
    };
    let mut ihdr = Vec::new();
    ihdr.extend(100_000u32.to_be_bytes());
    ihdr.extend(100_000u32.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    chunk(b"IHDR", &ihdr);
    chunk(b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
    chunk(b"IEND", &[]);
    png
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

#[test]
fn huge_dimensions_are_rejected_before_decoding() {
    assert_rejected(&huge_png_header(), "huge.png", "over the limit of 100000000 (see --max-pixels)");
}

#[test]
fn directory_with_bad_files_processes_the_good_ones_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let inputs = dir.path().join("in");
    std::fs::create_dir(&inputs).unwrap();
    save(&DynamicImage::ImageRgb8(photo(40, 30)), &inputs.join("good1.png"), ImageFormat::Png);
    save(&DynamicImage::ImageRgb8(photo(50, 20)), &inputs.join("good2.jpg"), ImageFormat::Jpeg);
    std::fs::write(inputs.join("bad1.jpg"), b"").unwrap();
    std::fs::write(inputs.join("bad2.png"), b"garbage").unwrap();
    std::fs::write(inputs.join("readme.txt"), b"not an image, not an input").unwrap();
    let outputs = dir.path().join("out");
    let result = run(&["run", s(&inputs), "--out-dir", s(&outputs), "--suffix", "_mask", "--jobs", "2"]);
    assert_eq!(result.status.code(), Some(1));
    let err = stderr(&result);
    assert_eq!(err.lines().count(), 2, "{err}");
    assert!(err.contains("bad1.jpg: empty file") && err.contains("bad2.png: "), "{err}");
    assert_eq!(image::image_dimensions(outputs.join("good1_mask.png")).unwrap(), (40, 30));
    assert_eq!(image::image_dimensions(outputs.join("good2_mask.png")).unwrap(), (50, 20));
    let mut written: Vec<_> = std::fs::read_dir(&outputs).unwrap().map(|e| e.unwrap().file_name()).collect();
    written.sort();
    assert_eq!(written, ["good1_mask.png", "good2_mask.png"]);
}

#[test]
fn stdin_to_stdout_round_trip() {
    let mut child = segattn(&["run", "-", "--out", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&encoded(ImageFormat::Png)).unwrap();
    let result = child.wait_with_output().unwrap();
    assert!(result.status.success(), "{}", stderr(&result));
    let mask = image::load_from_memory_with_format(&result.stdout, ImageFormat::Png).unwrap();
    assert_eq!((mask.width(), mask.height()), (64, 48));
}

/// `jpeg` with an EXIF APP1 segment saying "rotate 90° clockwise" (orientation 6).
fn with_exif_orientation_6(jpeg: &[u8]) -> Vec<u8> {
    let tiff: &[u8] = &[
        b'M', b'M', 0, 42, 0, 0, 0, 8, // big-endian header, IFD at 8
        0, 1, // one entry
        0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, 6, 0, 0, // Orientation, SHORT, 1, value 6
        0, 0, 0, 0, // no next IFD
    ];
    let mut app1 = vec![0xFF, 0xE1];
    app1.extend(((2 + 6 + tiff.len()) as u16).to_be_bytes());
    app1.extend(b"Exif\0\0");
    app1.extend(tiff);
    let mut out = jpeg[..2].to_vec();
    out.extend(app1);
    out.extend(&jpeg[2..]);
    out
}

#[test]
fn rotated_exif_jpeg_gives_an_upright_sized_mask() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("rotated.jpg");
    std::fs::write(&input, with_exif_orientation_6(&encoded(ImageFormat::Jpeg))).unwrap();
    let out = dir.path().join("mask.png");
    let result = run(&["run", s(&input), "--out", s(&out)]);
    assert!(result.status.success(), "{}", stderr(&result));
    // Stored 64x48, displayed 48x64.
    assert_eq!(image::image_dimensions(&out).unwrap(), (48, 64));
}

#[test]
fn every_format_and_pixel_type_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let inputs = dir.path().join("in");
    std::fs::create_dir(&inputs).unwrap();
    let rgb = DynamicImage::ImageRgb8(photo(40, 32));
    for (name, format) in [
        ("a.bmp", ImageFormat::Bmp),
        ("a.gif", ImageFormat::Gif),
        ("a.tiff", ImageFormat::Tiff),
        ("a.webp", ImageFormat::WebP),
    ] {
        save(&rgb, &inputs.join(name.replace("a.", &format!("{}.", &name[2..]))), format);
    }
    save(&DynamicImage::ImageLuma8(rgb.to_luma8()), &inputs.join("gray.png"), ImageFormat::Png);
    save(&DynamicImage::ImageRgb16(rgb.to_rgb16()), &inputs.join("deep.png"), ImageFormat::Png);
    save(&DynamicImage::ImageRgba8(rgb.to_rgba8()), &inputs.join("alpha.png"), ImageFormat::Png);
    let outputs = dir.path().join("out");
    let result = run(&["run", s(&inputs), "--out-dir", s(&outputs)]);
    assert!(result.status.success(), "{}", stderr(&result));
    for stem in ["bmp", "gif", "tiff", "webp", "gray", "deep", "alpha"] {
        assert_eq!(image::image_dimensions(outputs.join(format!("{stem}.png"))).unwrap(), (40, 32), "{stem}");
    }
}

#[test]
fn recursive_mirrors_subdirectories() {
    let dir = tempfile::tempdir().unwrap();
    let inputs = dir.path().join("in");
    std::fs::create_dir_all(inputs.join("sub")).unwrap();
    save(&DynamicImage::ImageRgb8(photo(32, 32)), &inputs.join("a.png"), ImageFormat::Png);
    save(&DynamicImage::ImageRgb8(photo(32, 32)), &inputs.join("sub/a.png"), ImageFormat::Png);
    let outputs = dir.path().join("out");
    let flat = run(&["run", s(&inputs), "--out-dir", s(&outputs)]);
    assert!(flat.status.success());
    assert!(outputs.join("a.png").exists() && !outputs.join("sub").exists());
    // a.png is written already: the deeper run keeps it and does the rest.
    let deep = run(&["run", s(&inputs), "--out-dir", s(&outputs), "--recursive", "--skip-existing"]);
    assert!(deep.status.success(), "{}", stderr(&deep));
    assert!(stderr(&deep).contains("skipped 1 photos"), "{}", stderr(&deep));
    assert!(outputs.join("sub/a.png").exists());
}

#[test]
fn refuses_to_write_over_an_input() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("photo.png");
    save(&DynamicImage::ImageRgb8(photo(32, 32)), &input, ImageFormat::Png);
    let before = std::fs::read(&input).unwrap();
    let result = run(&["run", s(&input), "--out", s(&input)]);
    assert_eq!(result.status.code(), Some(2));
    assert!(stderr(&result).contains("over an input"), "{}", stderr(&result));
    let result = run(&["run", s(dir.path()), "--out-dir", s(dir.path())]);
    assert_eq!(result.status.code(), Some(2));
    assert_eq!(std::fs::read(&input).unwrap(), before);
}

#[test]
fn missing_input_is_reported_and_the_rest_done() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let result = run(&["run", "no-such-photo.jpg", s(&sample("cat.jpg")), "--out-dir", s(&out)]);
    assert_eq!(result.status.code(), Some(1));
    assert_eq!(stderr(&result).trim(), "segattn: no-such-photo.jpg: no such file");
    assert!(out.join("cat.png").exists());
}

#[test]
fn usage_and_model_errors_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.png");
    let cat = sample("cat.jpg");
    // Several inputs with --out.
    assert_eq!(run(&["run", s(&cat), s(&cat), "--out", s(&out)]).status.code(), Some(2));
    // No output at all.
    assert_eq!(run(&["run", s(&cat)]).status.code(), Some(2));
    // Unknown flag (clap).
    assert_eq!(run(&["run", s(&cat), "--out", s(&out), "--bogus"]).status.code(), Some(2));
    // A broken model.
    let broken = dir.path().join("broken.safetensors");
    std::fs::write(&broken, b"nope").unwrap();
    let result = segattn_with(&["run", s(&cat), "--out", s(&out)], &broken, 64).output().unwrap();
    assert_eq!(result.status.code(), Some(2));
    assert!(stderr(&result).contains("broken.safetensors: not a readable safetensors file"));
    // No model named and an empty Hugging Face cache: the built-in model runs.
    let result = Command::new(env!("CARGO_BIN_EXE_segattn"))
        .args(["run", s(&cat), "--out", s(&out)])
        .env_remove("SEGATTN_WEIGHTS")
        .env_remove("SEGATTN_MODEL")
        .env_remove("HF_HUB_CACHE")
        .env("HF_HOME", dir.path())
        .output()
        .unwrap();
    assert_eq!(result.status.code(), Some(0), "{}", stderr(&result));
    assert!(out.exists());
    std::fs::remove_file(&out).unwrap();
    assert!(std::fs::read_dir(dir.path()).unwrap().all(|e| e.unwrap().file_name() != "hub"), "cache untouched");
    assert!(!out.exists());
}

#[test]
fn attn_map_variants_match_the_photo_size() {
    let dir = tempfile::tempdir().unwrap();
    let cat = sample("cat.jpg");
    for (name, extra) in [
        ("mean", vec![]),
        ("head1", vec!["--head", "1", "--layer", "-2", "--colormap", "jet"]),
        ("raw", vec!["--raw", "--colormap", "gray", "--layer", "0"]),
        ("rollout", vec!["--rollout", "--colormap", "viridis", "--alpha", "0.3"]),
    ] {
        let out = dir.path().join(format!("{name}.png"));
        let mut args = vec!["attn-map", s(&cat), "--out", s(&out)];
        args.extend(extra);
        let result = run(&args);
        assert!(result.status.success(), "{name}: {}", stderr(&result));
        assert_eq!(image::image_dimensions(&out).unwrap(), (451, 300), "{name}");
    }
    // Raw gray: the heat map alone, so every pixel is gray.
    let raw = image::open(dir.path().join("raw.png")).unwrap().into_rgb8();
    assert!(raw.pixels().all(|p| p[0] == p[1] && p[1] == p[2]));
    // All heads: 4 heads + mean = 5 tiles in a 3x2 grid.
    let all = dir.path().join("all.png");
    assert!(run(&["attn-map", s(&cat), "--out", s(&all), "--head", "all"]).status.success());
    assert_eq!(image::image_dimensions(&all).unwrap(), (451 * 3, 300 * 2));
}

#[test]
fn attn_map_rejects_bad_choices() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("a.png");
    let cat = sample("cat.jpg");
    for bad in [
        vec!["--head", "4"],
        vec!["--head", "best"],
        vec!["--layer", "3"],
        vec!["--layer", "-4"],
        vec!["--colormap", "plasma"],
        vec!["--alpha", "2"],
    ] {
        let mut args = vec!["attn-map", s(&cat), "--out", s(&out)];
        args.extend(bad.iter().copied());
        let result = run(&args);
        assert_eq!(result.status.code(), Some(2), "{bad:?}: {}", stderr(&result));
    }
    assert!(!out.exists());
}

#[test]
fn info_reports_the_inferred_config() {
    let result = run(&["info", "--json"]);
    assert!(result.status.success());
    let info: serde_json::Value = serde_json::from_slice(&result.stdout).unwrap();
    assert_eq!(
        (info["patch_size"].as_u64(), info["heads"].as_u64(), info["layers"].as_u64()),
        (Some(8), Some(4), Some(3))
    );
    assert_eq!(info["registers"], 0);
    assert_eq!(info["ncut_tau"], 0.2, "a DINO checkpoint gets TokenCut's threshold");
    assert!(info["parameters"].as_u64().unwrap() > 30_000);
    // The fixture's heads have 8 dimensions, which only the gemm path takes.
    assert_eq!(info["attention_kernel"], "gemm crate around a softmax pass");
}

#[test]
fn info_names_the_kernels_that_segattn_kernels_allows() {
    let result = segattn(&["info", "--json"]).env("SEGATTN_KERNELS", "portable").output().unwrap();
    assert!(result.status.success(), "{}", stderr(&result));
    let info: serde_json::Value = serde_json::from_slice(&result.stdout).unwrap();
    assert_eq!(info["linear_kernel"], "gemm crate");
}

#[test]
fn piped_stderr_has_no_progress_bar() {
    let dir = tempfile::tempdir().unwrap();
    let result = run(&["run", s(&sample("cat.jpg")), s(&sample("coffee.jpg")), "--out-dir", s(dir.path())]);
    assert!(result.status.success());
    assert!(result.stderr.is_empty(), "{}", stderr(&result));
}

#[test]
fn numbers_are_checked_when_the_command_line_is_read() {
    let cat = sample("cat.jpg");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("mask.png");
    let cases: [(&[&str], &str); 14] = [
        (&["--size", "0"], "--size <N>': must be 32 to 4096 pixels, got 0"),
        (&["--size", "1"], "must be 32 to 4096 pixels, got 1"),
        (&["--size", "18446744073709551615"], "must be 32 to 4096 pixels"),
        (&["--size", "-5"], "is not a whole number of pixels"),
        (&["--jobs", "0"], "--jobs <N>': must be at least 1"),
        (&["--mass", "0"], "--mass <MASS>': must be above 0 and at most 1, got 0"),
        (&["--mass", "5"], "must be above 0 and at most 1, got 5"),
        (&["--mass", "-1"], "must be above 0 and at most 1, got -1"),
        (&["--min-heads", "0"], "--min-heads <N>': must be at least 1"),
        (&["--tau", "nan"], "--tau <TAU>': must be at least 0 and below 1, got NaN"),
        (&["--tau", "5"], "must be at least 0 and below 1, got 5"),
        (&["--threshold", "-0.5"], "must be between 0 and 1, got -0.5"),
        (&["--suffix", "/../../escaped"], "may not hold a path separator"),
        (&["--min-heads", "7"], "--min-heads must be between 1 and 4 for this model, got 7"),
    ];
    for (extra, message) in cases {
        let mut args = vec!["run", s(&cat), "--out", s(&out)];
        if extra[0] == "--suffix" {
            args = vec!["run", s(&cat), "--out-dir", s(dir.path())];
        }
        args.extend(extra);
        let result = run(&args);
        let text = stderr(&result);
        assert_eq!(result.status.code(), Some(2), "{extra:?}: {text}");
        assert!(text.contains(message), "{extra:?}: {text}");
        assert_eq!(text.trim_end().lines().filter(|l| l.starts_with("error") || l.starts_with("segattn")).count(), 1);
        assert!(!text.contains("to pass '-"), "{extra:?}: clap's tip instead of the range: {text}");
        assert!(!out.exists());
    }
}

#[test]
fn too_many_jobs_are_capped_with_a_note() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("mask.png");
    let result = run(&["run", s(&sample("cat.jpg")), "--out", s(&out), "--jobs", "100000"]);
    assert!(result.status.success(), "{}", stderr(&result));
    assert!(stderr(&result).contains("--jobs 100000 capped at"), "{}", stderr(&result));
    assert!(out.exists());
}

#[test]
fn a_folder_without_photos_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    std::fs::write(empty.join("notes.txt"), "not a photo").unwrap();
    let result = run(&["run", s(&empty), "--out-dir", s(&dir.path().join("masks"))]);
    assert_eq!(result.status.code(), Some(1), "{}", stderr(&result));
    assert!(stderr(&result).contains("empty: no photos (jpg, jpeg, png"), "{}", stderr(&result));
}

#[test]
fn a_file_name_with_a_newline_stays_on_one_error_line() {
    let dir = tempfile::tempdir().unwrap();
    let photos = dir.path().join("photos");
    std::fs::create_dir(&photos).unwrap();
    std::fs::write(photos.join("bad\nname.jpg"), b"not a jpeg").unwrap();
    std::fs::copy(sample("cat.jpg"), photos.join("cat.jpg")).unwrap();
    let result = run(&["run", s(&photos), "--out-dir", s(&dir.path().join("masks"))]);
    assert_eq!(result.status.code(), Some(1));
    let text = stderr(&result);
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.contains("bad\\nname.jpg: "), "{text}");
}

#[test]
fn symlink_loops_are_followed_once() {
    let dir = tempfile::tempdir().unwrap();
    let photos = dir.path().join("photos");
    std::fs::create_dir_all(photos.join("sub")).unwrap();
    std::fs::copy(sample("cat.jpg"), photos.join("sub/cat.jpg")).unwrap();
    std::os::unix::fs::symlink("..", photos.join("sub/up")).unwrap();
    std::os::unix::fs::symlink(".", photos.join("sub/here")).unwrap();
    let masks = dir.path().join("masks");
    let result = run(&["run", s(&photos), "--out-dir", s(&masks), "--recursive"]);
    assert!(result.status.success(), "{}", stderr(&result));
    let mut written = Vec::new();
    for entry in walk(&masks) {
        written.push(entry.strip_prefix(&masks).unwrap().to_path_buf());
    }
    assert_eq!(written, [PathBuf::from("sub/cat.png")]);
}

/// Every file under `dir`, without following links.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if std::fs::symlink_metadata(&path).unwrap().is_dir() { files.extend(walk(&path)) } else { files.push(path) }
    }
    files
}

#[test]
fn eval_and_train_head_never_write_over_their_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    for file in ["model.safetensors", "config.json"] {
        std::fs::copy(weights().join(file), model.join(file)).unwrap();
    }
    let (photos, masks) = (dir.path().join("photos"), dir.path().join("masks"));
    std::fs::create_dir(&photos).unwrap();
    std::fs::create_dir(&masks).unwrap();
    for name in ["a", "b"] {
        std::fs::copy(sample("cat.jpg"), photos.join(format!("{name}.jpg"))).unwrap();
        save(
            &DynamicImage::ImageLuma8(image::GrayImage::new(451, 300)),
            &masks.join(format!("{name}.png")),
            ImageFormat::Png,
        );
    }
    let weights_file = model.join("model.safetensors");
    let before = std::fs::read(&weights_file).unwrap();
    let pairs = ["--images", s(&photos), "--masks", s(&masks)];
    let targets = [weights_file.clone(), model.join("config.json"), masks.join("a.png"), photos.join("b.jpg")];
    for target in &targets {
        let kept = std::fs::read(target).unwrap();
        for (command, flag) in [("eval", "--json"), ("train-head", "--out")] {
            let mut args = vec![command];
            args.extend(pairs);
            args.extend([flag, s(target)]);
            let result = segattn_with(&args, &model, 64).output().unwrap();
            assert_eq!(result.status.code(), Some(2), "{command} {flag} {}: {}", target.display(), stderr(&result));
            assert!(stderr(&result).contains("one of this command's inputs"), "{}", stderr(&result));
            assert_eq!(std::fs::read(target).unwrap(), kept, "{command} wrote over {}", target.display());
        }
    }
    assert_eq!(std::fs::read(&weights_file).unwrap(), before);
}

#[test]
fn completions_and_the_man_page_cover_every_command() {
    let bin = env!("CARGO_BIN_EXE_segattn");
    for shell in ["bash", "zsh", "fish", "powershell"] {
        let out = Command::new(bin).args(["completions", shell]).output().unwrap();
        assert!(out.status.success(), "{shell}: {}", stderr(&out));
        let script = String::from_utf8(out.stdout).unwrap();
        for command in ["run", "attn-map", "serve", "--out-dir", "--skip-existing"] {
            assert!(script.contains(command), "{shell} completions lack {command}");
        }
    }
    let out = Command::new(bin).arg("man").output().unwrap();
    let page = String::from_utf8(out.stdout).unwrap();
    assert!(page.starts_with(".ie") && page.contains(".TH segattn 1"), "{page}");
    assert!(page.contains("serve") && page.contains("attn\\-map"), "{page}");
    let bad = Command::new(bin).args(["completions", "tcsh"]).output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
}
