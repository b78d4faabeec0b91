//! Hostile and careless use: outputs that are links, FIFOs or directories,
//! FIFOs in scanned folders, endless inputs, header bombs under a memory
//! limit, file-size limits, closed streams, a config.json that contradicts
//! its checkpoint. Every case uses files, FIFOs and links in a temporary
//! folder, never the machine's device nodes.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use image::{DynamicImage, Rgb, RgbImage};

mod common;
use common::{fixture, s, sample, segattn_with, stderr};

fn segattn(args: &[&str]) -> Command {
    segattn_with(args, &fixture("dino_vit"), 64)
}

/// Waits for `child`, killing it and failing the test past `limit`: a hang
/// is the bug some of these cases are about.
fn finish(mut child: Child, limit: Duration) -> Output {
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            child.kill().unwrap();
            panic!("segattn still running after {limit:?}: {}", stderr(&child.wait_with_output().unwrap()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn mkfifo(path: &Path) {
    let status = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(status.success());
}

/// segattn's `ARGS` through `sh -c`, after the shell lines in `setup`
/// (limits, redirections), with the test model.
fn through_shell(setup: &str, args: &[&str]) -> Output {
    let script = format!("{setup}\nexec \"$0\" \"$@\"");
    let mut all: Vec<&str> = args.to_vec();
    let weights = fixture("dino_vit");
    all.extend(["--weights", s(&weights), "--size", "64"]);
    Command::new("sh")
        .args(["-c", &script, env!("CARGO_BIN_EXE_segattn")])
        .args(all)
        .env_remove("SEGATTN_WEIGHTS")
        .env_remove("SEGATTN_MODEL")
        .output()
        .unwrap()
}

fn noisy_photo(path: &Path, width: u32, height: u32) {
    let mut state = 12345u32;
    DynamicImage::ImageRgb8(RgbImage::from_fn(width, height, |_, _| {
        state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
        let [a, b, c, _] = state.to_le_bytes();
        Rgb([a, b, c])
    }))
    .save(path)
    .unwrap();
}

fn is_png(bytes: &[u8]) -> bool {
    bytes.starts_with(b"\x89PNG\r\n\x1a\n")
}

fn temp_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".segattn-"))
        .collect()
}

#[test]
fn an_output_link_is_followed_not_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real.png");
    std::fs::write(&real, b"old").unwrap();
    let link = dir.path().join("x.png");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let out = segattn(&["run", s(&sample("cat.jpg")), "--out", s(&link)]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "the link was replaced");
    assert!(is_png(&std::fs::read(&real).unwrap()), "the link's target was not written");
    assert!(temp_files(dir.path()).is_empty());

    // A link to nothing is an error, and stays.
    let dangling = dir.path().join("dangling.png");
    std::os::unix::fs::symlink(dir.path().join("missing/none.png"), &dangling).unwrap();
    let out = segattn(&["run", s(&sample("cat.jpg")), "--out", s(&dangling)]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("dangling.png: a symbolic link to nothing"), "{}", stderr(&out));
    assert!(std::fs::symlink_metadata(&dangling).unwrap().file_type().is_symlink());
}

#[test]
fn an_output_fifo_is_written_into_and_a_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("mask.png");
    mkfifo(&fifo);
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            std::fs::File::open(fifo).unwrap().read_to_end(&mut bytes).unwrap();
            bytes
        })
    };
    let child = segattn(&["run", s(&sample("cat.jpg")), "--out", s(&fifo)]).stderr(Stdio::piped()).spawn().unwrap();
    let out = finish(child, Duration::from_secs(60));
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo(), "the FIFO was replaced");
    // If segattn never opened it, a writer of our own ends the reader's wait.
    use std::os::unix::fs::OpenOptionsExt;
    drop(std::fs::OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK).open(&fifo));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(is_png(&reader.join().unwrap()), "no PNG came through the FIFO");

    let folder = dir.path().join("folder.png");
    std::fs::create_dir(&folder).unwrap();
    std::fs::write(folder.join("inside"), b"kept").unwrap();
    let out = segattn(&["run", s(&sample("cat.jpg")), "--out", s(&folder)]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("folder.png: a directory, not a file"), "{}", stderr(&out));
    assert_eq!(std::fs::read(folder.join("inside")).unwrap(), b"kept");
}

#[test]
fn overwrite_in_a_directory_replaces_only_regular_files() {
    let dir = tempfile::tempdir().unwrap();
    let photos = dir.path().join("photos");
    std::fs::create_dir(&photos).unwrap();
    for name in ["a", "b", "c"] {
        noisy_photo(&photos.join(format!("{name}.png")), 40, 30);
    }
    let masks = dir.path().join("masks");
    std::fs::create_dir(&masks).unwrap();
    let elsewhere = dir.path().join("elsewhere.txt");
    std::fs::write(&elsewhere, b"not ours").unwrap();
    std::os::unix::fs::symlink(&elsewhere, masks.join("a.png")).unwrap();
    mkfifo(&masks.join("b.png"));
    std::fs::write(masks.join("c.png"), b"earlier").unwrap();
    let child = segattn(&["run", s(&photos), "--out-dir", s(&masks), "--overwrite"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = finish(child, Duration::from_secs(60));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("a.png: a symbolic link, not a file segattn wrote; left as it is"), "{err}");
    assert!(err.contains("b.png: a FIFO, not a file segattn wrote; left as it is"), "{err}");
    assert_eq!(std::fs::read(&elsewhere).unwrap(), b"not ours");
    assert!(is_png(&std::fs::read(masks.join("c.png")).unwrap()));
}

#[test]
fn a_fifo_in_a_scanned_folder_is_reported_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let photos = dir.path().join("photos");
    std::fs::create_dir(&photos).unwrap();
    noisy_photo(&photos.join("a.png"), 40, 30);
    mkfifo(&photos.join("x.jpg"));
    let masks = dir.path().join("masks");
    let child = segattn(&["run", s(&photos), "--out-dir", s(&masks)]).stderr(Stdio::piped()).spawn().unwrap();
    let out = finish(child, Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("x.jpg: not a regular file"), "{}", stderr(&out));
    assert!(masks.join("a.png").is_file());
}

#[test]
fn an_endless_input_is_an_error_not_all_of_memory() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = segattn(&["run", "-", "--out", s(&dir.path().join("x.png")), "--max-pixels", "1000"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    // Zeros until segattn stops reading: far more than the limit, if it never did.
    let feeder = std::thread::spawn(move || {
        let block = vec![0u8; 1 << 20];
        let mut sent = 0u64;
        while stdin.write_all(&block).is_ok() && sent < 4 << 30 {
            sent += block.len() as u64;
        }
        sent
    });
    let out = finish(child, Duration::from_secs(60));
    let sent = feeder.join().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("<stdin>: over 67116864 bytes"), "{}", stderr(&out));
    assert!(sent < 1 << 30, "segattn read {sent} bytes");
}

/// A BMP header of `width` x `height` pixels, 24 bits, and no pixels.
fn bmp_header(width: u32, height: u32) -> Vec<u8> {
    let row = (width * 3).div_ceil(4) * 4;
    let image_size = u64::from(row) * u64::from(height);
    let mut b = Vec::new();
    b.extend_from_slice(b"BM");
    b.extend_from_slice(&((54 + image_size) as u32).to_le_bytes());
    b.extend_from_slice(&[0; 4]);
    b.extend_from_slice(&54u32.to_le_bytes());
    b.extend_from_slice(&40u32.to_le_bytes());
    b.extend_from_slice(&width.to_le_bytes());
    b.extend_from_slice(&height.to_le_bytes());
    b.extend_from_slice(&1u16.to_le_bytes());
    b.extend_from_slice(&24u16.to_le_bytes());
    b.extend_from_slice(&[0; 4]);
    b.extend_from_slice(&(image_size as u32).to_le_bytes());
    b.extend_from_slice(&[0; 16]);
    b
}

#[test]
fn memory_a_photo_cannot_have_is_its_error_and_the_batch_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let photos = dir.path().join("photos");
    std::fs::create_dir(&photos).unwrap();
    std::fs::write(photos.join("bomb.bmp"), bmp_header(60000, 60000)).unwrap();
    noisy_photo(&photos.join("fine.png"), 40, 30);
    let masks = dir.path().join("masks");
    // 3 GB of address space: the model and threads fit, 60000x60000 does not.
    let out = through_shell(
        "ulimit -v 3000000",
        &["run", s(&photos), "--out-dir", s(&masks), "--max-pixels", "10000000000", "--jobs", "1"],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("bomb.bmp: image is 60000x60000: the 21600000000 bytes of memory"), "{err}");
    assert!(masks.join("fine.png").is_file(), "{err}");
}

#[test]
fn a_file_size_limit_fails_the_output_not_the_batch() {
    let dir = tempfile::tempdir().unwrap();
    let photos = dir.path().join("photos");
    std::fs::create_dir(&photos).unwrap();
    for name in ["a", "b"] {
        noisy_photo(&photos.join(format!("{name}.png")), 200, 150);
    }
    let masks = dir.path().join("masks");
    std::fs::create_dir(&masks).unwrap();
    // 1 block of 512 bytes: each overlay of a noisy photo is larger.
    let overlays = dir.path().join("overlays");
    let out = through_shell(
        "ulimit -f 1",
        &["run", s(&photos), "--out-dir", s(&masks), "--overlay", s(&overlays), "--jobs", "1"],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "killed by a signal? {err}");
    for name in ["a.png", "b.png"] {
        assert!(err.contains(&format!("{name}: cannot write: File too large")), "{err}");
    }
    assert!(temp_files(&overlays).is_empty() && temp_files(&masks).is_empty(), "{err}");
}

/// A pipe whose reading end is closed before segattn starts: every write
/// fails with EPIPE, however small, so the case does not race the child.
fn read_end_closed() -> Stdio {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    Stdio::from(writer)
}

#[test]
fn closed_streams_are_errors_not_panics() {
    // Standard output a pipe nobody reads: EPIPE at the first line.
    for args in [vec!["list"], vec!["info"], vec!["info", "--json"]] {
        let mut command = if args[0] == "list" {
            let mut plain = Command::new(env!("CARGO_BIN_EXE_segattn"));
            plain.args(&args);
            plain
        } else {
            segattn(&args)
        };
        let child = command.stdout(read_end_closed()).stderr(Stdio::piped()).spawn().unwrap();
        let out = finish(child, Duration::from_secs(60));
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        assert!(!stderr(&out).contains("panicked"), "{args:?}: {}", stderr(&out));
    }
    // Closed when segattn starts.
    let out = through_shell("exec >&-", &["info", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("standard output is closed"), "{}", stderr(&out));
    // Standard error a pipe nobody reads, with a failure to report.
    let dir = tempfile::tempdir().unwrap();
    let child = segattn(&["run", s(&dir.path().join("missing.jpg")), "--out", s(&dir.path().join("x.png"))])
        .stderr(read_end_closed())
        .spawn()
        .unwrap();
    let out = finish(child, Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn a_config_that_contradicts_its_checkpoint_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    std::fs::copy(fixture("dino_vit/model.safetensors"), model.join("model.safetensors")).unwrap();
    let config = std::fs::read_to_string(fixture("dino_vit/config.json")).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&config).unwrap();
    let layers = config["num_hidden_layers"].as_u64().unwrap();
    config["num_hidden_layers"] = serde_json::json!(1);
    std::fs::write(model.join("config.json"), config.to_string()).unwrap();
    let out = segattn_with(&["run", s(&sample("cat.jpg")), "--out", s(&dir.path().join("x.png"))], &model, 64)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("num_hidden_layers is 1, but the tensors of")
            && stderr(&out).contains(&format!("have {layers}")),
        "{}",
        stderr(&out)
    );
    assert!(!dir.path().join("x.png").exists());
}

#[test]
fn another_heads_options_are_refused_not_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let cat = sample("cat.jpg");
    for (args, message) in [
        (
            vec!["--head", "ncut", "--mass", "0.5"],
            "--mass and --min-heads tune the attn head: they do not go with --head ncut",
        ),
        (vec!["--head", "attn", "--tau", "0.5"], "--tau tunes the ncut head: it does not go with --head attn"),
    ] {
        let mut all = vec!["run", s(&cat), "--out", s(&out)];
        all.extend(args);
        let result = segattn(&all).output().unwrap();
        assert_eq!(result.status.code(), Some(2), "{}", stderr(&result));
        assert!(stderr(&result).contains(message), "{}", stderr(&result));
        assert!(!out.exists());
    }
}

/// The tag tells an earlier output from a photo in a scanned directory; a
/// named photo's output replaces any regular file with `--overwrite`, as
/// `cp` would, and none without it.
#[test]
fn overwrite_replaces_any_file_but_the_photos_of_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let photos = dir.path().join("photos");
    std::fs::create_dir(&photos).unwrap();
    noisy_photo(&photos.join("a.jpg"), 40, 30);
    noisy_photo(&photos.join("a.png"), 30, 40);
    let users = std::fs::read(photos.join("a.png")).unwrap();

    // Scanned, a.png is a photo of this run: never written over.
    let out = segattn(&["run", s(&photos), "--out-dir", s(&photos), "--overwrite"]).output().unwrap();
    assert_ne!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(std::fs::read(photos.join("a.png")).unwrap(), users, "{}", stderr(&out));

    // Named alone, a.jpg's output is a.png: kept without --overwrite...
    let a = photos.join("a.jpg");
    let out = segattn(&["run", s(&a), "--out-dir", s(&photos)]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("a.png already exists"), "{}", stderr(&out));
    assert_eq!(std::fs::read(photos.join("a.png")).unwrap(), users);
    // ...and replaced with it.
    let out = segattn(&["run", s(&a), "--out-dir", s(&photos), "--overwrite"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(segattn::image_io::is_segattn_output(&photos.join("a.png")));
}

#[test]
fn an_existing_directory_as_out_is_named_as_one() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("folder");
    std::fs::create_dir(&folder).unwrap();
    let with_slash = format!("{}/", folder.display());
    let out = segattn(&["run", s(&sample("cat.jpg")), "--out", &with_slash]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("folder/: a directory, not a file"), "{}", stderr(&out));
    assert_eq!(std::fs::read_dir(&folder).unwrap().count(), 0);
}

#[test]
fn eval_with_nothing_scored_prints_no_means() {
    let dir = tempfile::tempdir().unwrap();
    let (images, masks) = (dir.path().join("images"), dir.path().join("masks"));
    std::fs::create_dir(&images).unwrap();
    std::fs::create_dir(&masks).unwrap();
    std::fs::write(images.join("broken.jpg"), b"not a photo").unwrap();
    noisy_photo(&masks.join("broken.png"), 40, 30);
    let report = dir.path().join("report.json");
    let out = segattn(&["eval", "--images", s(&images), "--masks", s(&masks), "--json", s(&report)]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("none of the 1 images could be scored"), "{}", stderr(&out));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("IoU"));
    assert!(!report.exists());
}

/// Found by fuzzing the planner: a link to nothing at an output's name was
/// taken for a free name, and the photo failed only when written.
#[test]
fn a_link_to_nothing_at_an_output_name_is_an_existing_output() {
    let dir = tempfile::tempdir().unwrap();
    let photos = dir.path().join("photos");
    std::fs::create_dir(&photos).unwrap();
    noisy_photo(&photos.join("a.jpg"), 40, 30);
    let masks = dir.path().join("masks");
    std::fs::create_dir(&masks).unwrap();
    std::os::unix::fs::symlink(dir.path().join("nowhere"), masks.join("a.png")).unwrap();
    let out = segattn(&["run", s(&photos), "--out-dir", s(&masks)]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("a.png already exists: --skip-existing keeps it"), "{}", stderr(&out));
    assert_eq!(std::fs::read_link(masks.join("a.png")).unwrap(), dir.path().join("nowhere"));
    assert!(temp_files(&masks).is_empty());
}

/// Found by fuzzing the planner: a photo `x.jpg` and a folder `x.png` of
/// photos beside it, scanned with --recursive, want `x.png` as a mask and
/// as the folder of the other masks. One is refused while planning; the
/// other is written whole.
#[test]
fn an_output_that_is_another_outputs_folder_is_refused_while_planning() {
    let dir = tempfile::tempdir().unwrap();
    let photos = dir.path().join("photos");
    std::fs::create_dir_all(photos.join("x.png")).unwrap();
    noisy_photo(&photos.join("x.jpg"), 40, 30);
    noisy_photo(&photos.join("x.png/y.jpg"), 40, 30);
    let masks = dir.path().join("masks");
    let out = segattn(&["run", s(&photos), "--out-dir", s(&masks), "--recursive"]).output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    let mask = masks.join("x.png");
    if mask.is_file() {
        assert!(err.contains("would be inside") && err.contains("the output for"), "{err}");
        assert!(is_png(&std::fs::read(&mask).unwrap()));
    } else {
        assert!(err.contains("is a directory of the outputs for"), "{err}");
        assert!(is_png(&std::fs::read(mask.join("y.png")).unwrap()));
    }
}

/// eval never picks one of two files silently, and a folder or report it
/// cannot use is one error before any scoring.
#[test]
fn eval_refuses_ambiguous_stems_and_missing_folders_up_front() {
    let dir = tempfile::tempdir().unwrap();
    let (images, masks) = (dir.path().join("images"), dir.path().join("masks"));
    std::fs::create_dir(&images).unwrap();
    std::fs::create_dir(&masks).unwrap();
    noisy_photo(&images.join("cat.jpg"), 40, 30);
    noisy_photo(&masks.join("cat.png"), 40, 30);
    let eval = |extra: &[&str]| {
        let mut args = vec!["eval", "--images", s(&images), "--masks", s(&masks)];
        args.extend(extra);
        segattn(&args).output().unwrap()
    };
    let missing = dir.path().join("no_such_dir");
    let report = missing.join("report.json");
    for (extra, message) in [
        (vec!["--predictions", s(&missing)], "no_such_dir: cannot list directory"),
        (vec!["--json", s(&report)], "no directory"),
    ] {
        let out = eval(&extra);
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert!(stderr(&out).contains(message), "{}", stderr(&out));
        assert!(out.stdout.is_empty(), "scored before refusing");
    }
    noisy_photo(&images.join("cat.png"), 40, 30);
    noisy_photo(&masks.join("cat.bmp"), 40, 30);
    let out = eval(&[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("share the stem cat"), "{}", stderr(&out));
    std::fs::remove_file(images.join("cat.png")).unwrap();
    // Two masks of one stem, too.
    let out = eval(&[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("share the stem cat") && stderr(&out).contains("cat.bmp"), "{}", stderr(&out));
}

/// Found by fuzzing the planner: two outputs of one photo that are one file
/// (here --overlay into the mask folder; in the fuzzer's tree, through
/// links) are refused while planning, and neither is written.
#[test]
fn two_outputs_of_one_photo_in_one_file_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let masks = dir.path().join("masks");
    let out =
        segattn(&["run", s(&sample("cat.jpg")), "--out-dir", s(&masks), "--overlay", s(&masks)]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("cat.png is the same file as its output"), "{}", stderr(&out));
    assert!(std::fs::read_dir(&masks).map_or(true, |mut entries| entries.next().is_none()));
}
