//! PNG encoding. Every PNG segattn writes carries a `Software: segattn` text
//! chunk, so a later run can tell its own outputs from a user's photos.

use std::io::BufReader;
use std::path::Path;

use anyhow::{Context, Result, bail};
use image::DynamicImage;

const SOFTWARE_KEY: &str = "Software";
const SOFTWARE: &str = "segattn";

/// PNG bytes of `image` (8-bit gray, RGB or RGBA), with the fast
/// compression level: outputs are masks and previews, and encoding time
/// matters more than a few kilobytes.
pub fn encode_png(image: &DynamicImage) -> Result<Vec<u8>> {
    let color = match image {
        DynamicImage::ImageLuma8(_) => png::ColorType::Grayscale,
        DynamicImage::ImageRgb8(_) => png::ColorType::Rgb,
        DynamicImage::ImageRgba8(_) => png::ColorType::Rgba,
        other => bail!("cannot encode {:?} pixels as PNG", other.color()),
    };
    let mut bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut bytes, image.width(), image.height());
    encoder.set_color(color);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::Fast);
    encoder.set_filter(png::Filter::Adaptive);
    encoder.add_text_chunk(SOFTWARE_KEY.into(), SOFTWARE.into()).context("cannot encode PNG")?;
    let mut writer = encoder.write_header().context("cannot encode PNG")?;
    writer.write_image_data(image.as_bytes()).context("cannot encode PNG")?;
    writer.finish().context("cannot encode PNG")?;
    Ok(bytes)
}

/// Whether `path` is a PNG that segattn wrote (it carries our text chunk).
/// Anything unreadable counts as not ours, so it is treated as the user's.
pub fn is_segattn_output(path: &Path) -> bool {
    let Ok(file) = std::fs::File::open(path) else {
        return false;
    };
    let Ok(reader) = png::Decoder::new(BufReader::new(file)).read_info() else {
        return false;
    };
    reader.info().uncompressed_latin1_text.iter().any(|t| t.keyword == SOFTWARE_KEY && t.text == SOFTWARE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GrayImage, Luma};

    #[test]
    fn outputs_are_marked_and_photos_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let image = DynamicImage::ImageLuma8(GrayImage::from_pixel(5, 3, Luma([200])));
        let ours = dir.path().join("ours.png");
        std::fs::write(&ours, encode_png(&image).unwrap()).unwrap();
        let theirs = dir.path().join("theirs.png");
        image.save(&theirs).unwrap();
        assert!(is_segattn_output(&ours));
        assert!(!is_segattn_output(&theirs));
        assert!(!is_segattn_output(&dir.path().join("missing.png")));
        let decoded = image::open(&ours).unwrap();
        assert_eq!(decoded.as_bytes(), image.as_bytes());
    }
}
