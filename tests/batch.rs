//! Large batches from shell scripts: damaged photos, failed writes, existing
//! outputs, resuming, sharding, reports and signals.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use image::{DynamicImage, ImageFormat, Rgb, RgbImage};

mod common;
use common::{fixture, s, sample, segattn_with, stderr};

/// `segattn ARGS` on the small test model, with piped stdio.
fn segattn(args: &[&str]) -> Command {
    segattn_with(args, &fixture("dino_vit"), 64)
}

fn run(args: &[&str]) -> Output {
    segattn(args).output().unwrap()
}

fn photo(width: u32, height: u32, seed: u32) -> DynamicImage {
    DynamicImage::ImageRgb8(RgbImage::from_fn(width, height, |x, y| {
        Rgb([(x * 7 + seed) as u8, (y * 5 + 3 * seed) as u8, ((x + y) * 3) as u8])
    }))
}

/// Every file under `dir`, relative to it, sorted.
fn files(dir: &Path) -> BTreeSet<PathBuf> {
    fn walk(root: &Path, dir: &Path, found: &mut BTreeSet<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, found);
            } else {
                found.insert(path.strip_prefix(root).unwrap().to_path_buf());
            }
        }
    }
    let mut found = BTreeSet::new();
    walk(dir, dir, &mut found);
    found
}

fn set(names: &[&str]) -> BTreeSet<PathBuf> {
    names.iter().map(PathBuf::from).collect()
}

#[test]
fn damaged_jpegs_are_errors_unless_lenient() {
    let dir = tempfile::tempdir().unwrap();
    let cat = std::fs::read(sample("cat.jpg")).unwrap();
    let mut flipped = cat.clone();
    // One bit of the compressed data, where the flip breaks the bit stream.
    // (Most flips only change a block's colours; Pillow accepts those too.)
    flipped[cat.len() * 7 / 10] ^= 0x01;
    let damaged = [
        ("cut_3000.jpg", cat[..3000].to_vec()),
        ("cut_half.jpg", cat[..cat.len() / 2].to_vec()),
        ("cut_90.jpg", cat[..cat.len() * 9 / 10].to_vec()),
        ("flipped.jpg", flipped),
    ];
    for (name, bytes) in &damaged {
        let input = dir.path().join(name);
        std::fs::write(&input, bytes).unwrap();
        let out = dir.path().join(format!("{name}.png"));
        let result = run(&["run", s(&input), "--out", s(&out)]);
        assert_eq!(result.status.code(), Some(1), "{name}: {}", stderr(&result));
        let err = stderr(&result);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.starts_with(&format!("segattn: {}: damaged JPEG", input.display())), "{err}");
        assert!(err.trim_end().ends_with("; --lenient decodes what it can"), "{err}");
        assert!(!out.exists(), "{name}: a mask of a damaged photo");

        let lenient = run(&["run", s(&input), "--out", s(&out), "--lenient"]);
        if *name != "cut_3000.jpg" {
            // Enough of the photo is there to decode, greyed below the damage.
            assert_eq!(lenient.status.code(), Some(0), "{name}: {}", stderr(&lenient));
            assert_eq!(image::image_dimensions(&out).unwrap(), (451, 300));
        }
    }
    // The intact photo decodes the same in both modes.
    let (strict, lenient) = (dir.path().join("strict.png"), dir.path().join("lenient.png"));
    assert!(run(&["run", s(&sample("cat.jpg")), "--out", s(&strict)]).status.success());
    assert!(run(&["run", s(&sample("cat.jpg")), "--out", s(&lenient), "--lenient"]).status.success());
    assert_eq!(std::fs::read(&strict).unwrap(), std::fs::read(&lenient).unwrap());
}

#[test]
fn a_failed_image_leaves_none_of_its_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let photos = dir.path().join("photos");
    std::fs::create_dir(&photos).unwrap();
    for (i, name) in ["a", "b"].iter().enumerate() {
        photo(48, 40, i as u32).save(photos.join(format!("{name}.png"))).unwrap();
    }
    let (masks, overlays) = (dir.path().join("masks"), dir.path().join("overlays"));
    // b's overlay cannot be written: a directory holds its name.
    std::fs::create_dir_all(overlays.join("b.png")).unwrap();
    let result = run(&["run", s(&photos), "--out-dir", s(&masks), "--overlay", s(&overlays), "--overwrite"]);
    assert_eq!(result.status.code(), Some(1), "{}", stderr(&result));
    let err = stderr(&result);
    assert!(err.contains("b.png: ") && err.lines().count() == 1, "{err}");
    assert_eq!(files(&masks), set(&["a.png"]));
    assert!(files(&overlays).contains(Path::new("a.png")));
    assert!(!files(&overlays).iter().any(|f| f.to_string_lossy().contains(".tmp")), "{:?}", files(&overlays));
}

#[test]
fn closed_or_full_standard_output_is_an_error() {
    let cat = sample("cat.jpg");
    // A shell's `>&-`: the descriptor is closed when segattn starts.
    let closed = Command::new("sh")
        .args(["-c", "exec \"$0\" run \"$1\" --out - --weights \"$2\" --size 64 >&-"])
        .args([env!("CARGO_BIN_EXE_segattn"), s(&cat), s(&fixture("dino_vit"))])
        .output()
        .unwrap();
    assert_eq!(closed.status.code(), Some(1), "{}", stderr(&closed));
    assert!(stderr(&closed).contains("standard output is closed"), "{}", stderr(&closed));

    // Full: a file-size limit of 0 blocks fails every write, as a full disk does.
    let dir = tempfile::tempdir().unwrap();
    let sink = dir.path().join("stdout.bin");
    for args in [vec!["--out", "-"], vec!["--out", s(&dir.path().join("mask.png")), "--json"]] {
        let result = Command::new("sh")
            .args(["-c", "ulimit -f 0; exec \"$0\" \"$@\" >\"$OUT\"", env!("CARGO_BIN_EXE_segattn"), "run", s(&cat)])
            .args(&args)
            .args(["--weights", s(&fixture("dino_vit")), "--size", "64"])
            .env("OUT", &sink)
            .output()
            .unwrap();
        assert_eq!(result.status.code(), Some(1), "{args:?}: {}", stderr(&result));
        assert!(stderr(&result).contains("File too large"), "{}", stderr(&result));
    }
    // Redirected to a file on purpose is not closed.
    let file = std::fs::File::create(&sink).unwrap();
    let written = segattn(&["run", s(&cat), "--out", "-"]).stdout(file).output().unwrap();
    assert_eq!(written.status.code(), Some(0), "{}", stderr(&written));
    assert!(std::fs::read(&sink).unwrap().starts_with(b"\x89PNG"));
}

#[test]
fn existing_outputs_are_kept_unless_told_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let photos = dir.path().join("photos");
    std::fs::create_dir(&photos).unwrap();
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        photo(40, 32, i as u32).save(photos.join(format!("{name}.png"))).unwrap();
    }
    let masks = dir.path().join("masks");
    let batch = |extra: &[&str]| {
        let mut args = vec!["run", s(&photos), "--out-dir", s(&masks), "--json"];
        args.extend(extra);
        run(&args)
    };
    assert!(batch(&[]).status.success());
    let ino = |name: &str| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(masks.join(name)).unwrap());
    let first = ino("a.png");

    // A second batch into the same directory replaces nothing.
    let again = batch(&[]);
    assert_eq!(again.status.code(), Some(1));
    let err = stderr(&again);
    assert_eq!(err.lines().count(), 3, "{err}");
    assert!(err.contains("a.png already exists: --skip-existing keeps it, --overwrite replaces it"), "{err}");
    assert_eq!(ino("a.png"), first);

    // Resuming: only what is missing is done.
    std::fs::remove_file(masks.join("b.png")).unwrap();
    let resumed = batch(&["--skip-existing"]);
    assert_eq!(resumed.status.code(), Some(0), "{}", stderr(&resumed));
    assert!(stderr(&resumed).contains("skipped 2 photos whose outputs exist"), "{}", stderr(&resumed));
    let lines: Vec<serde_json::Value> =
        String::from_utf8_lossy(&resumed.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.iter().filter(|l| l["skipped"] == "outputs exist").count(), 2);
    assert_eq!(lines.iter().filter(|l| l["outputs"]["mask"].is_string()).count(), 1);
    assert_eq!(ino("a.png"), first);
    assert_eq!(files(&masks), set(&["a.png", "b.png", "c.png"]));

    // A photo whose mask exists but whose overlay does not gets the overlay only.
    let overlays = dir.path().join("overlays");
    let with_overlay = batch(&["--skip-existing", "--overlay", s(&overlays)]);
    assert_eq!(with_overlay.status.code(), Some(0), "{}", stderr(&with_overlay));
    assert_eq!(files(&overlays), set(&["a.png", "b.png", "c.png"]));
    assert_eq!(ino("a.png"), first);

    let replaced = batch(&["--overwrite"]);
    assert_eq!(replaced.status.code(), Some(0), "{}", stderr(&replaced));
    assert_ne!(ino("a.png"), first);
}

#[test]
fn rerunning_into_the_input_directory_skips_earlier_masks_but_never_a_photo() {
    let dir = tempfile::tempdir().unwrap();
    let photos = dir.path().join("photos");
    std::fs::create_dir(&photos).unwrap();
    for (i, name) in ["a", "b"].iter().enumerate() {
        photo(40, 32, i as u32).save(photos.join(format!("{name}.jpg"))).unwrap();
    }
    let beside = |extra: &[&str]| {
        let mut args = vec!["run", s(&photos), "--out-dir", s(&photos), "--suffix", "_mask"];
        args.extend(extra);
        run(&args)
    };
    assert!(beside(&[]).status.success());
    let again = beside(&["--skip-existing"]);
    assert_eq!(again.status.code(), Some(0), "{}", stderr(&again));
    assert!(stderr(&again).contains("skipped 2 photos"), "{}", stderr(&again));
    assert_eq!(files(&photos), set(&["a.jpg", "a_mask.png", "b.jpg", "b_mask.png"]));

    // A photo of the user's where a mask would go is an input, never overwritten.
    let mine = photos.join("c_mask.png");
    photo(40, 32, 9).save(&mine).unwrap();
    photo(40, 32, 9).save(photos.join("c.png")).unwrap();
    let before = std::fs::read(&mine).unwrap();
    let refused = beside(&["--overwrite"]);
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    assert!(stderr(&refused).contains("c_mask.png over an input"), "{}", stderr(&refused));
    assert_eq!(std::fs::read(&mine).unwrap(), before);
}

/// Twelve photos in two folders, and the outputs of one unsharded run.
fn shard_fixture() -> (tempfile::TempDir, PathBuf, BTreeSet<PathBuf>) {
    let dir = tempfile::tempdir().unwrap();
    let photos = dir.path().join("photos");
    for i in 0..12 {
        let path = photos.join(if i % 2 == 0 { "x" } else { "y" }).join(format!("p{i}.png"));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        photo(36, 28, i).save(path).unwrap();
    }
    let whole = dir.path().join("whole");
    let result = run(&["run", s(&photos), "--out-dir", s(&whole), "-r"]);
    assert!(result.status.success(), "{}", stderr(&result));
    let expected = files(&whole);
    assert_eq!(expected.len(), 12);
    (dir, photos, expected)
}

#[test]
fn shards_together_write_one_run_s_outputs_once() {
    let (dir, photos, expected) = shard_fixture();
    let mut seen = BTreeSet::new();
    let mut reported = 0;
    for k in 0..3 {
        let out = dir.path().join(format!("shard{k}"));
        let report = dir.path().join(format!("report{k}.jsonl"));
        let shard = format!("{k}/3");
        let args = ["run", s(&photos), "--out-dir", s(&out), "-r", "--shard", &shard, "--report", s(&report)];
        let result = run(&args);
        assert!(result.status.success(), "{}", stderr(&result));
        let written = files(&out);
        assert!(!written.is_empty() && written.len() < 12, "shard {k}: {written:?}");
        assert!(written.is_disjoint(&seen), "shard {k} repeats another's outputs");
        seen.extend(written.iter().cloned());
        let lines = std::fs::read_to_string(&report).unwrap();
        reported += lines.lines().count();
        for line in lines.lines() {
            let line: serde_json::Value = serde_json::from_str(line).unwrap();
            assert!(line["outputs"]["mask"].as_str().unwrap().starts_with(s(&out)));
        }
    }
    assert_eq!(seen, expected);
    assert_eq!(reported, 12);

    // The same split from the environment (SEGATTN_SHARD), as a Job's index.
    let out = dir.path().join("env");
    let result =
        segattn(&["run", s(&photos), "--out-dir", s(&out), "-r"]).env("SEGATTN_SHARD", "1/3").output().unwrap();
    assert!(result.status.success(), "{}", stderr(&result));
    assert_eq!(files(&out), files(&dir.path().join("shard1")));

    for bad in ["3/3", "1/0", "x"] {
        let result = run(&["run", s(&photos), "--out-dir", s(&out), "--shard", bad]);
        assert_eq!(result.status.code(), Some(2), "{bad}");
    }
    // More shards than photos: an empty shard is not an error.
    let single = dir.path().join("single");
    std::fs::create_dir(&single).unwrap();
    std::fs::copy(photos.join("x/p0.png"), single.join("p0.png")).unwrap();
    let codes: Vec<Option<i32>> = (0..4)
        .map(|k| run(&["run", s(&single), "--out-dir", s(&out), "--shard", &format!("{k}/4")]).status.code())
        .collect();
    assert_eq!(codes, [Some(0); 4]);
}

#[test]
fn gnu_parallel_running_the_shards_writes_one_run_s_outputs() {
    if Command::new("parallel").arg("--version").output().is_err() {
        assert!(std::env::var_os("SEGATTN_REQUIRE_PARALLEL").is_none(), "GNU parallel is not installed");
        eprintln!("skipped: GNU parallel (Debian package `parallel`) is not installed");
        return;
    }
    let (dir, photos, expected) = shard_fixture();
    let out = dir.path().join("together");
    let reports = dir.path().join("reports");
    std::fs::create_dir(&reports).unwrap();
    // As the README's example, with the local machine in place of --sshlogin.
    let result = Command::new("parallel")
        .args(["--will-cite", "--halt", "now,fail=1"])
        .arg(format!(
            "{} run {} --out-dir {} -r --weights {} --size 64 --shard {{}}/4 --report {}/{{}}.jsonl",
            env!("CARGO_BIN_EXE_segattn"),
            s(&photos),
            s(&out),
            s(&fixture("dino_vit")),
            s(&reports)
        ))
        .args([":::", "0", "1", "2", "3"])
        .env_remove("SEGATTN_WEIGHTS")
        .env_remove("SEGATTN_MODEL")
        .output()
        .unwrap();
    assert!(result.status.success(), "{}", stderr(&result));
    assert_eq!(files(&out), expected);
    let lines: usize =
        (0..4).map(|k| std::fs::read_to_string(reports.join(format!("{k}.jsonl"))).unwrap().lines().count()).sum();
    assert_eq!(lines, 12);
}

#[test]
fn the_report_holds_successes_and_failures_and_never_replaces_an_input() {
    let dir = tempfile::tempdir().unwrap();
    let photos = dir.path().join("photos");
    std::fs::create_dir(&photos).unwrap();
    photo(40, 32, 1).save(photos.join("good.png")).unwrap();
    std::fs::write(photos.join("bad.jpg"), b"not a photo").unwrap();
    let report = dir.path().join("report.jsonl");
    let masks = dir.path().join("masks");
    let result = run(&["run", s(&photos), "--out-dir", s(&masks), "--report", s(&report)]);
    assert_eq!(result.status.code(), Some(1));
    assert!(result.stdout.is_empty());
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(&report).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    let bad = lines.iter().find(|l| l["input"].as_str().unwrap().ends_with("bad.jpg")).unwrap();
    assert!(bad["error"].as_str().unwrap().contains("not a supported image"), "{bad}");

    // A resumed run appends.
    let resumed = run(&["run", s(&photos), "--out-dir", s(&masks), "--report", s(&report), "--skip-existing"]);
    assert_eq!(resumed.status.code(), Some(1));
    assert_eq!(std::fs::read_to_string(&report).unwrap().lines().count(), 4);

    let photo_path = photos.join("good.png");
    let before = std::fs::read(&photo_path).unwrap();
    let refused = run(&["run", s(&photos), "--out-dir", s(&masks), "--report", s(&photo_path), "--overwrite"]);
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    assert_eq!(std::fs::read(&photo_path).unwrap(), before);
}

#[test]
fn run_and_attn_map_never_write_over_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    for file in ["model.safetensors", "config.json"] {
        std::fs::copy(fixture("dino_vit").join(file), model.join(file)).unwrap();
    }
    for target in ["model.safetensors", "config.json"] {
        let target = model.join(target);
        let kept = std::fs::read(&target).unwrap();
        for command in ["run", "attn-map"] {
            let result =
                segattn_with(&[command, s(&sample("cat.jpg")), "--out", s(&target)], &model, 64).output().unwrap();
            assert_eq!(result.status.code(), Some(2), "{command}: {}", stderr(&result));
            assert!(stderr(&result).contains("one of this command's inputs"), "{}", stderr(&result));
            assert_eq!(std::fs::read(&target).unwrap(), kept);
        }
    }
}

#[test]
fn attn_map_grid_of_a_large_photo_is_scaled_to_fit() {
    let dir = tempfile::tempdir().unwrap();
    let large = dir.path().join("large.png");
    DynamicImage::ImageRgb8(RgbImage::from_pixel(6000, 4000, Rgb([90, 120, 60]))).save(&large).unwrap();
    let out = dir.path().join("grid.png");
    let result = run(&["attn-map", s(&large), "--out", s(&out), "--head", "all"]);
    assert_eq!(result.status.code(), Some(0), "{}", stderr(&result));
    let (w, h) = image::image_dimensions(&out).unwrap();
    assert!(u64::from(w) * u64::from(h) <= 16_000_000, "{w}x{h}");
    assert!(w > 3000, "scaled no more than needed: {w}x{h}");
}

#[test]
fn interrupted_runs_leave_no_temporary_files_and_exit_130() {
    let dir = tempfile::tempdir().unwrap();
    let photos = dir.path().join("photos");
    std::fs::create_dir(&photos).unwrap();
    // Large photos, so the outputs take long enough to write to be caught mid-way.
    let large = photo(3000, 2000, 0);
    let mut bytes = std::io::Cursor::new(Vec::new());
    large.write_to(&mut bytes, ImageFormat::Png).unwrap();
    for i in 0..40 {
        std::fs::write(photos.join(format!("p{i:02}.png")), bytes.get_ref()).unwrap();
    }
    let (masks, overlays, cutouts) = (dir.path().join("m"), dir.path().join("o"), dir.path().join("c"));
    for signal in ["INT", "TERM"] {
        let mut child = segattn(&[
            "run",
            s(&photos),
            "--out-dir",
            s(&masks),
            "--overlay",
            s(&overlays),
            "--cutout",
            s(&cutouts),
            "--overwrite",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
        // Wait until the first outputs appear: writing is under way.
        let start = Instant::now();
        while files(&cutouts).is_empty() && start.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(150));
        let killed = Command::new("kill").args([&format!("-{signal}"), &child.id().to_string()]).status().unwrap();
        assert!(killed.success());
        let status = child.wait().unwrap();
        let expected = if signal == "INT" { 130 } else { 143 };
        assert_eq!(status.code(), Some(expected), "{signal}: {status:?}");
        for out in [&masks, &overlays, &cutouts] {
            let temporary: Vec<_> = files(out).into_iter().filter(|f| f.to_string_lossy().ends_with(".tmp")).collect();
            assert!(temporary.is_empty(), "{signal}: {temporary:?}");
        }
    }
}
