//! What the fuzz targets share: a scratch directory for the files they
//! hand to segattn (its readers take paths, as users give them), the test
//! fixtures they start from, and the checks every loaded model must pass.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use segattn::head::{self, AttentionMass};
use segattn::model::Vit;

/// A directory of this process's own, removed when it exits normally.
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("a scratch directory")).path()
}

/// Writes `bytes` to `name` in the scratch directory, replacing what an
/// earlier input left there.
pub fn scratch_file(name: &str, bytes: &[u8]) -> PathBuf {
    let path = scratch().join(name);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).expect("scratch directory");
    }
    std::fs::write(&path, bytes).expect("scratch file");
    path
}

/// A file of the test suite's fixtures (`tests/fixtures/...`).
pub fn fixture(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(relative)
}

/// A model that loaded must segment a small photo into probabilities, or
/// say why not: a mask of NaN would be a broken checkpoint passed off as a
/// result.
pub fn check_model(model: &Vit) {
    let photo = image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(40, 24, |x, y| {
        image::Rgb([(x * 6) as u8, (y * 10) as u8, ((x + y) * 3) as u8])
    }));
    let short_side = model.config().patch_size * 2;
    if let Ok(map) = head::segment(model, &AttentionMass::default(), &photo, short_side) {
        check_map(&map.to_pixels(photo.width(), photo.height()).values);
    }
}

/// Every value of a head's map is a probability.
pub fn check_map(values: &[f32]) {
    if let Some(bad) = values.iter().find(|v| !(0.0..=1.0).contains(*v)) {
        panic!("a map value of {bad} is not a probability");
    }
}
