//! Photo -> normalized model input: flatten alpha, resize to a patch-aligned
//! size, normalize with the ImageNet statistics every DINO model was trained with.

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use fast_image_resize::{FilterType, ResizeAlg, ResizeOptions, Resizer};
use image::{DynamicImage, RgbImage};

pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// The short side fed to the model when the user does not choose: the
/// resolution of the DINO paper's attention figures.
pub const DEFAULT_SHORT_SIDE: usize = 480;

/// Most patches an input may have at any size: a 1024x1024 grid of 8-pixel
/// patches.
pub const MAX_PATCHES: usize = 16_384;

/// The widest aspect ratio fed whole at the chosen short side. A wider
/// panorama, or a sliver a pixel high, is scaled down to the patches of one
/// this wide: scaled to a short side of 480, a 1x10000 photo would
/// otherwise ask for thousands of tokens, and attention costs the square.
pub const WIDEST_ASPECT: f64 = 4.0;

/// The grid of whole patches an image is cut into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PatchGrid {
    pub rows: usize,
    pub cols: usize,
}

impl PatchGrid {
    pub fn len(&self) -> usize {
        self.rows * self.cols
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Size of the model input for a `width` x `height` photo: the short side
/// becomes `short_side`, the long side keeps the aspect ratio, and both are
/// rounded to whole patches (at least one); a photo wider than
/// [`WIDEST_ASPECT`] is scaled down further to that shape's patch count,
/// and no input has more than [`MAX_PATCHES`].
pub fn input_size(width: u32, height: u32, short_side: usize, patch_size: usize) -> (usize, usize) {
    let (w, h) = (width as f64, height as f64);
    let p = patch_size as f64;
    let side = short_side as f64 / p;
    let budget = (WIDEST_ASPECT * side * side).clamp(1.0, MAX_PATCHES as f64);
    let mut scale = short_side as f64 / w.min(h);
    let patches = (w * scale / p) * (h * scale / p);
    if patches > budget {
        scale *= (budget / patches).sqrt();
    }
    let budget = budget as usize;
    let cells = |x: f64| ((x * scale / p).round() as usize).max(1);
    let rows = cells(h).min(budget);
    // A sliver's short side is held at one patch: trim the long side instead.
    let cols = cells(w).min(budget / rows);
    let rows = rows.min(budget / cols);
    (cols * patch_size, rows * patch_size)
}

/// RGB pixels of `image`, with any transparency composited over white so
/// that a cut-out's empty background reads as background.
pub fn to_rgb(image: &DynamicImage) -> RgbImage {
    if !image.color().has_alpha() {
        return image.to_rgb8();
    }
    let rgba = image.to_rgba8();
    let mut rgb = RgbImage::new(rgba.width(), rgba.height());
    for (dst, src) in rgb.pixels_mut().zip(rgba.pixels()) {
        let alpha = src[3] as u32;
        for c in 0..3 {
            dst[c] = ((src[c] as u32 * alpha + 255 * (255 - alpha) + 127) / 255) as u8;
        }
    }
    rgb
}

/// Bicubic (Catmull-Rom) resize, as torchvision's `Resize` does for DINO.
pub fn resize(rgb: &RgbImage, width: usize, height: usize) -> Result<RgbImage> {
    if (rgb.width() as usize, rgb.height() as usize) == (width, height) {
        return Ok(rgb.clone());
    }
    let mut out = RgbImage::new(width as u32, height as u32);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::CatmullRom));
    Resizer::new().resize(rgb, &mut out, &options).context("cannot resize image")?;
    Ok(out)
}

/// (1, 3, H, W) tensor of ImageNet-normalized pixels.
pub fn normalize(rgb: &RgbImage) -> Result<Tensor> {
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    if w == 0 || h == 0 {
        bail!("empty image");
    }
    let mut planar = vec![0f32; 3 * w * h];
    let (red, rest) = planar.split_at_mut(w * h);
    let (green, blue) = rest.split_at_mut(w * h);
    for (i, p) in rgb.pixels().enumerate() {
        red[i] = (p[0] as f32 / 255.0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0];
        green[i] = (p[1] as f32 / 255.0 - IMAGENET_MEAN[1]) / IMAGENET_STD[1];
        blue[i] = (p[2] as f32 / 255.0 - IMAGENET_MEAN[2]) / IMAGENET_STD[2];
    }
    Ok(Tensor::from_vec(planar, (1, 3, h, w), &Device::Cpu)?)
}

/// The whole step: a photo to the model's input tensor.
pub fn model_input(image: &DynamicImage, short_side: usize, patch_size: usize) -> Result<Tensor> {
    let rgb = to_rgb(image);
    let (w, h) = input_size(rgb.width(), rgb.height(), short_side, patch_size);
    normalize(&resize(&rgb, w, h)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_size_keeps_aspect_and_whole_patches() {
        assert_eq!(input_size(640, 480, 480, 8), (640, 480));
        assert_eq!(input_size(480, 640, 224, 16), (224, 304));
        assert_eq!(input_size(1000, 500, 224, 14), (448, 224));
        // Up to 4:1 a panorama keeps its scale; wider, or a sliver, it gets
        // the patches of a 4:1 one, and at least one patch a side.
        assert_eq!(input_size(2000, 500, 224, 16), (896, 224));
        let (w, h) = input_size(4000, 10, 224, 16);
        assert!((w / 16) * (h / 16) <= 4 * 14 * 14 && h >= 16, "{w}x{h}");
        assert_eq!(input_size(10_000, 1, 224, 16), (4 * 14 * 14 * 16, 16));
        assert_eq!(input_size(1, 100_000, 480, 8), (8, 4 * 60 * 60 * 8));
        assert_eq!(input_size(100_000, 1, 1024, 8), (MAX_PATCHES * 8, 8));
        let (w, h) = input_size(20_000, 20_000, 8000, 8);
        assert!((w / 8) * (h / 8) <= MAX_PATCHES && w == h, "{w}x{h}");
        assert_eq!(input_size(10, 10, 4, 16), (16, 16));
    }

    #[test]
    fn alpha_is_composited_over_white() {
        let mut rgba = image::RgbaImage::new(2, 1);
        rgba.put_pixel(0, 0, image::Rgba([0, 0, 0, 0]));
        rgba.put_pixel(1, 0, image::Rgba([10, 20, 30, 255]));
        let rgb = to_rgb(&DynamicImage::ImageRgba8(rgba));
        assert_eq!(rgb.get_pixel(0, 0).0, [255, 255, 255]);
        assert_eq!(rgb.get_pixel(1, 0).0, [10, 20, 30]);
    }

    #[test]
    fn normalize_is_channel_first_imagenet() {
        let rgb = RgbImage::from_pixel(3, 2, image::Rgb([255, 0, 128]));
        let t = normalize(&rgb).unwrap();
        assert_eq!(t.dims(), &[1, 3, 2, 3]);
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        assert!((v[0] - (1.0 - 0.485) / 0.229).abs() < 1e-6);
        assert!((v[6] - (0.0 - 0.456) / 0.224).abs() < 1e-6);
        assert!((v[12] - (128.0 / 255.0 - 0.406) / 0.225).abs() < 1e-6);
    }
}
