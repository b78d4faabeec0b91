//! Edge-aware refinement: a guided filter (He et al., 2010) with the photo as
//! guide, so a map upsampled from the patch grid follows the object's edges.

use image::{DynamicImage, RgbImage};

use crate::maps::PixelMap;
use crate::model::Vit;
use crate::preprocess;

/// `map` of `photo`, segmented at `short_side`, with its edges moved to the
/// photo's own: a filter radius of about half a patch, in photo pixels, is
/// enough to follow an edge and not enough to invent new ones.
pub fn refine_to_photo(model: &Vit, map: &PixelMap, photo: &DynamicImage, short_side: usize) -> PixelMap {
    let short = photo.width().min(photo.height()) as usize;
    let radius = (model.config().patch_size * short / short_side.max(1) / 2).max(2);
    guided_filter(map, &preprocess::to_rgb(photo), radius, 1e-3)
}

/// Mean over a (2r+1)² window, clipped at the borders, via a summed-area table.
fn box_mean(values: &[f32], width: usize, height: usize, radius: usize) -> Vec<f32> {
    let stride = width + 1;
    let mut table = vec![0f64; stride * (height + 1)];
    for y in 0..height {
        let mut row = 0f64;
        for x in 0..width {
            row += values[y * width + x] as f64;
            table[(y + 1) * stride + x + 1] = table[y * stride + x + 1] + row;
        }
    }
    let mut out = vec![0f32; width * height];
    for y in 0..height {
        let (y0, y1) = (y.saturating_sub(radius), (y + radius + 1).min(height));
        for x in 0..width {
            let (x0, x1) = (x.saturating_sub(radius), (x + radius + 1).min(width));
            let sum =
                table[y1 * stride + x1] - table[y0 * stride + x1] - table[y1 * stride + x0] + table[y0 * stride + x0];
            out[y * width + x] = (sum / ((y1 - y0) * (x1 - x0)) as f64) as f32;
        }
    }
    out
}

/// Filters `map` (values in [0, 1]) guided by the photo's luminance. `radius`
/// is in pixels; `eps` sets how strong an edge must be to be kept.
pub fn guided_filter(map: &PixelMap, photo: &RgbImage, radius: usize, eps: f32) -> PixelMap {
    let (w, h) = (map.width as usize, map.height as usize);
    let guide: Vec<f32> =
        photo.pixels().map(|p| (0.299 * p[0] as f32 + 0.587 * p[1] as f32 + 0.114 * p[2] as f32) / 255.0).collect();
    let p = &map.values;
    let product = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).collect::<Vec<f32>>();
    let mean_i = box_mean(&guide, w, h, radius);
    let mean_p = box_mean(p, w, h, radius);
    let corr_ii = box_mean(&product(&guide, &guide), w, h, radius);
    let corr_ip = box_mean(&product(&guide, p), w, h, radius);
    let mut a = vec![0f32; w * h];
    let mut b = vec![0f32; w * h];
    for i in 0..w * h {
        let variance = corr_ii[i] - mean_i[i] * mean_i[i];
        let covariance = corr_ip[i] - mean_i[i] * mean_p[i];
        a[i] = covariance / (variance + eps);
        b[i] = mean_p[i] - a[i] * mean_i[i];
    }
    let mean_a = box_mean(&a, w, h, radius);
    let mean_b = box_mean(&b, w, h, radius);
    let values = (0..w * h).map(|i| (mean_a[i] * guide[i] + mean_b[i]).clamp(0.0, 1.0)).collect();
    PixelMap { width: map.width, height: map.height, values }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    #[test]
    fn box_mean_of_a_constant_is_the_constant() {
        let out = box_mean(&[2.0; 35], 7, 5, 2);
        assert!(out.iter().all(|v| (v - 2.0).abs() < 1e-6));
        assert_eq!(box_mean(&[0.0, 3.0, 6.0], 3, 1, 1), vec![1.5, 3.0, 4.5]);
    }

    #[test]
    fn blurry_mask_snaps_to_the_photo_edge() {
        // A photo dark on the left 10 columns, bright on the right 10; the map
        // ramps across the middle as a patch-grid upsampling would.
        let photo = RgbImage::from_fn(20, 8, |x, _| if x < 10 { Rgb([20, 20, 20]) } else { Rgb([230, 230, 230]) });
        let values = (0..160).map(|i| (((i % 20) as f32 - 4.5) / 11.0).clamp(0.0, 1.0)).collect();
        let map = PixelMap { width: 20, height: 8, values };
        let refined = guided_filter(&map, &photo, 4, 1e-4);
        let at = |m: &PixelMap, x: usize| m.values[3 * 20 + x];
        // The jump across the edge gets sharper.
        assert!(at(&refined, 10) - at(&refined, 9) > 2.0 * (at(&map, 10) - at(&map, 9)));
    }
}
