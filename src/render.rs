//! Turning per-pixel maps into pictures: masks, overlays, cut-outs, heat maps.

use image::{GrayImage, Rgb, RgbImage, Rgba, RgbaImage};

use crate::maps::PixelMap;

/// 8-bit mask: 0/255 at `threshold`, or the probability scaled to 0..255 when `soft`.
pub fn mask(map: &PixelMap, threshold: f32, soft: bool) -> GrayImage {
    let pixels = map
        .values
        .iter()
        .map(|&p| {
            if soft {
                (p.clamp(0.0, 1.0) * 255.0).round() as u8
            } else if p >= threshold {
                255
            } else {
                0
            }
        })
        .collect();
    GrayImage::from_raw(map.width, map.height, pixels).expect("map holds one value per pixel")
}

/// Fraction of foreground pixels and their bounding box `[x0, y0, x1, y1]`
/// (inclusive), or `None` when the mask is empty.
pub fn mask_stats(mask: &GrayImage) -> (f64, Option<[u32; 4]>) {
    let mut count = 0u64;
    let mut bbox: Option<[u32; 4]> = None;
    for (x, y, p) in mask.enumerate_pixels() {
        if p[0] >= 128 {
            count += 1;
            bbox = Some(match bbox {
                None => [x, y, x, y],
                Some([x0, y0, x1, y1]) => [x0.min(x), y0.min(y), x1.max(x), y1.max(y)],
            });
        }
    }
    (count as f64 / (mask.width() as f64 * mask.height() as f64), bbox)
}

const TINT: [u8; 3] = [255, 40, 40];
const OUTLINE: [u8; 3] = [255, 255, 0];

/// The photo with the foreground tinted and its outline drawn.
pub fn overlay(photo: &RgbImage, mask: &GrayImage) -> RgbImage {
    let inside = |x: i64, y: i64| {
        x >= 0
            && y >= 0
            && x < mask.width() as i64
            && y < mask.height() as i64
            && mask.get_pixel(x as u32, y as u32)[0] >= 128
    };
    // Thick enough to see on a large photo, one pixel on a small one.
    let radius = (photo.width().min(photo.height()) / 400).max(1) as i64;
    let mut out = photo.clone();
    for (x, y, pixel) in out.enumerate_pixels_mut() {
        let (x, y) = (x as i64, y as i64);
        if !inside(x, y) {
            continue;
        }
        let on_edge =
            [(-radius, 0), (radius, 0), (0, -radius), (0, radius)].iter().any(|(dx, dy)| !inside(x + dx, y + dy));
        *pixel = if on_edge { Rgb(OUTLINE) } else { blend(pixel, &Rgb(TINT), 0.45) };
    }
    out
}

/// RGBA photo whose alpha is the mask: background transparent.
pub fn cutout(photo: &RgbImage, mask: &GrayImage) -> RgbaImage {
    RgbaImage::from_fn(photo.width(), photo.height(), |x, y| {
        let [r, g, b] = photo.get_pixel(x, y).0;
        Rgba([r, g, b, mask.get_pixel(x, y)[0]])
    })
}

fn blend(under: &Rgb<u8>, over: &Rgb<u8>, alpha: f32) -> Rgb<u8> {
    Rgb(std::array::from_fn(|c| (under[c] as f32 * (1.0 - alpha) + over[c] as f32 * alpha).round() as u8))
}

/// Colour scales for heat maps, as matplotlib draws them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Colormap {
    Viridis,
    Inferno,
    Jet,
    #[value(alias = "grey")]
    Gray,
}

/// matplotlib's viridis and inferno at 17 evenly spaced stops; linear
/// interpolation between them stays within 7/255 of the full tables.
const VIRIDIS: [[u8; 3]; 17] = [
    [68, 1, 84],
    [72, 24, 106],
    [71, 45, 123],
    [66, 64, 134],
    [59, 82, 139],
    [51, 99, 141],
    [44, 114, 142],
    [38, 130, 142],
    [33, 145, 140],
    [31, 160, 136],
    [40, 174, 128],
    [63, 188, 115],
    [94, 201, 98],
    [132, 212, 75],
    [173, 220, 48],
    [216, 226, 25],
    [253, 231, 37],
];
const INFERNO: [[u8; 3]; 17] = [
    [0, 0, 4],
    [11, 7, 36],
    [33, 12, 74],
    [61, 9, 101],
    [87, 16, 110],
    [113, 25, 110],
    [138, 34, 106],
    [163, 44, 97],
    [188, 55, 84],
    [210, 70, 68],
    [228, 90, 49],
    [241, 115, 29],
    [249, 142, 9],
    [252, 172, 17],
    [249, 203, 53],
    [242, 234, 105],
    [252, 255, 164],
];

/// Piecewise-linear function through `(t, value)` stops.
fn piecewise(stops: &[(f32, f32)], t: f32) -> f32 {
    let upper = stops.iter().position(|&(x, _)| x >= t).unwrap_or(stops.len() - 1).max(1);
    let ((x0, y0), (x1, y1)) = (stops[upper - 1], stops[upper]);
    if x1 <= x0 { y1 } else { y0 + (y1 - y0) * ((t - x0) / (x1 - x0)).clamp(0.0, 1.0) }
}

impl Colormap {
    /// Colour of `t` in [0, 1].
    pub fn color(self, t: f32) -> Rgb<u8> {
        let t = if t.is_nan() { 0.0 } else { t.clamp(0.0, 1.0) };
        let from_table = |table: &[[u8; 3]; 17]| {
            let x = t * 16.0;
            let i = (x.floor() as usize).min(15);
            let f = x - i as f32;
            Rgb(std::array::from_fn(|c| (table[i][c] as f32 * (1.0 - f) + table[i + 1][c] as f32 * f).round() as u8))
        };
        match self {
            Colormap::Viridis => from_table(&VIRIDIS),
            Colormap::Inferno => from_table(&INFERNO),
            // matplotlib's jet segment data.
            Colormap::Jet => {
                let r = piecewise(&[(0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)], t);
                let g = piecewise(&[(0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)], t);
                let b = piecewise(&[(0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)], t);
                Rgb([r, g, b].map(|v| (v * 255.0).round() as u8))
            }
            Colormap::Gray => Rgb([(t * 255.0).round() as u8; 3]),
        }
    }
}

/// Heat map of `map` (values in [0, 1]), blended over `photo` with `alpha`
/// when one is given.
pub fn heatmap(map: &PixelMap, colormap: Colormap, photo: Option<&RgbImage>, alpha: f32) -> RgbImage {
    RgbImage::from_fn(map.width, map.height, |x, y| {
        let heat = colormap.color(map.values[(y * map.width + x) as usize]);
        match photo {
            Some(photo) => blend(photo.get_pixel(x, y), &heat, alpha),
            None => heat,
        }
    })
}

/// 3x5 bitmap glyphs for tile labels ("h0".."h99", "mean").
fn glyph(c: char) -> [u8; 5] {
    match c {
        '0' => [0b111, 0b101, 0b101, 0b101, 0b111],
        '1' => [0b010, 0b110, 0b010, 0b010, 0b111],
        '2' => [0b111, 0b001, 0b111, 0b100, 0b111],
        '3' => [0b111, 0b001, 0b111, 0b001, 0b111],
        '4' => [0b101, 0b101, 0b111, 0b001, 0b001],
        '5' => [0b111, 0b100, 0b111, 0b001, 0b111],
        '6' => [0b111, 0b100, 0b111, 0b101, 0b111],
        '7' => [0b111, 0b001, 0b010, 0b010, 0b010],
        '8' => [0b111, 0b101, 0b111, 0b101, 0b111],
        '9' => [0b111, 0b101, 0b111, 0b001, 0b111],
        'h' => [0b100, 0b100, 0b111, 0b101, 0b101],
        'm' => [0b000, 0b111, 0b111, 0b101, 0b101],
        'e' => [0b111, 0b101, 0b111, 0b100, 0b111],
        'a' => [0b111, 0b001, 0b111, 0b101, 0b111],
        'n' => [0b000, 0b110, 0b101, 0b101, 0b101],
        _ => [0; 5],
    }
}

/// Draws `text` in white on a black box at the top-left corner of `image`.
pub fn label(image: &mut RgbImage, text: &str) {
    let scale = (image.width().min(image.height()) / 60).max(2);
    let (box_w, box_h) = ((text.chars().count() as u32 * 4 + 1) * scale, 7 * scale);
    for y in 0..box_h.min(image.height()) {
        for x in 0..box_w.min(image.width()) {
            let (gx, gy) = (x / scale, y / scale);
            let lit = gx >= 1 && (1..6).contains(&gy) && {
                let (index, column) = (((gx - 1) / 4) as usize, (gx - 1) % 4);
                column < 3
                    && text.chars().nth(index).is_some_and(|c| glyph(c)[(gy - 1) as usize] >> (2 - column) & 1 == 1)
            };
            image.put_pixel(x, y, if lit { Rgb([255, 255, 255]) } else { Rgb([0, 0, 0]) });
        }
    }
}

/// Tiles of equal size laid out in a near-square grid.
pub fn tile_grid(tiles: &[RgbImage]) -> RgbImage {
    let Some(first) = tiles.first() else {
        return RgbImage::new(1, 1);
    };
    let columns = (tiles.len() as f64).sqrt().ceil() as u32;
    let rows = (tiles.len() as u32).div_ceil(columns);
    let (w, h) = (first.width(), first.height());
    let mut grid = RgbImage::from_pixel(w * columns, h * rows, Rgb([0, 0, 0]));
    for (i, tile) in tiles.iter().enumerate() {
        let (col, row) = (i as u32 % columns, i as u32 / columns);
        image::imageops::replace(&mut grid, tile, (col * w) as i64, (row * h) as i64);
    }
    grid
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Luma;

    fn gray(width: u32, height: u32, f: impl Fn(u32, u32) -> bool) -> GrayImage {
        GrayImage::from_fn(width, height, |x, y| Luma([if f(x, y) { 255 } else { 0 }]))
    }

    #[test]
    fn mask_thresholds_and_soft_scales() {
        let map = PixelMap { width: 3, height: 1, values: vec![0.2, 0.5, 0.9] };
        assert_eq!(mask(&map, 0.5, false).into_raw(), vec![0, 255, 255]);
        assert_eq!(mask(&map, 0.5, true).into_raw(), vec![51, 128, 230]);
    }

    #[test]
    fn stats_give_area_and_bbox() {
        let m = gray(10, 5, |x, y| (2..=4).contains(&x) && (1..=2).contains(&y));
        let (area, bbox) = mask_stats(&m);
        assert!((area - 6.0 / 50.0).abs() < 1e-12);
        assert_eq!(bbox, Some([2, 1, 4, 2]));
        assert_eq!(mask_stats(&gray(3, 3, |_, _| false)), (0.0, None));
    }

    #[test]
    fn colormaps_hit_their_ends() {
        assert_eq!(Colormap::Viridis.color(0.0).0, [68, 1, 84]);
        assert_eq!(Colormap::Viridis.color(1.0).0, [253, 231, 37]);
        assert_eq!(Colormap::Inferno.color(1.0).0, [252, 255, 164]);
        assert_eq!(Colormap::Jet.color(0.0).0, [0, 0, 128]);
        // matplotlib's jet(0.5), from its 256-entry table: [125, 255, 122].
        let mid = Colormap::Jet.color(0.5).0;
        assert!(mid.iter().zip([125, 255, 122]).all(|(a, b)| a.abs_diff(b) <= 3), "{mid:?}");
        assert_eq!(Colormap::Gray.color(0.5).0, [128, 128, 128]);
    }

    #[test]
    fn overlay_outlines_and_tints_only_the_mask() {
        let photo = RgbImage::from_pixel(8, 8, Rgb([0, 0, 255]));
        let m = gray(8, 8, |x, y| (2..6).contains(&x) && (2..6).contains(&y));
        let out = overlay(&photo, &m);
        assert_eq!(out.get_pixel(0, 0).0, [0, 0, 255]);
        assert_eq!(out.get_pixel(2, 3).0, OUTLINE);
        assert_eq!(out.get_pixel(3, 3).0, blend(&Rgb([0, 0, 255]), &Rgb(TINT), 0.45).0);
        let cut = cutout(&photo, &m);
        assert_eq!((cut.get_pixel(0, 0)[3], cut.get_pixel(3, 3)[3]), (0, 255));
    }

    #[test]
    fn grid_places_tiles_row_by_row() {
        let tiles: Vec<RgbImage> = (0..5).map(|i| RgbImage::from_pixel(2, 2, Rgb([i * 10, 0, 0]))).collect();
        let grid = tile_grid(&tiles);
        assert_eq!(grid.dimensions(), (6, 4));
        assert_eq!(grid.get_pixel(4, 0)[0], 20);
        assert_eq!(grid.get_pixel(2, 2)[0], 40);
        assert_eq!(grid.get_pixel(4, 2)[0], 0);
    }
}
