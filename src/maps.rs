//! Maps over a photo: one value per patch of the model's grid, or one per
//! pixel, and the bilinear upsampling from the first to the second.

use anyhow::{Result, bail};

use crate::preprocess::PatchGrid;

/// One value per patch, row-major over the patch grid.
#[derive(Debug, Clone, PartialEq)]
pub struct PatchMap {
    pub grid: PatchGrid,
    pub values: Vec<f32>,
}

/// One value per pixel of an image, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct PixelMap {
    pub width: u32,
    pub height: u32,
    pub values: Vec<f32>,
}

impl PatchMap {
    pub fn new(grid: PatchGrid, values: Vec<f32>) -> Result<Self> {
        if values.len() != grid.len() {
            bail!("{} values for a {}x{} patch grid", values.len(), grid.rows, grid.cols);
        }
        Ok(Self { grid, values })
    }

    pub fn at(&self, row: usize, col: usize) -> f32 {
        self.values[row * self.grid.cols + col]
    }

    /// Rescaled to [0, 1] (all zeros when the map is flat).
    pub fn min_max_normalized(&self) -> Self {
        let lo = self.values.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = self.values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let span = hi - lo;
        let values = self.values.iter().map(|v| if span > 0.0 { (v - lo) / span } else { 0.0 }).collect();
        Self { grid: self.grid, values }
    }

    /// Bilinear upsampling to `width` x `height` with patch centres at pixel
    /// centres, so the map covers the whole photo smoothly.
    pub fn upsample(&self, width: u32, height: u32) -> PixelMap {
        let axis = |out: u32, cells: usize| -> Vec<(usize, usize, f32)> {
            (0..out)
                .map(|o| {
                    let src = ((o as f32 + 0.5) * cells as f32 / out as f32 - 0.5).clamp(0.0, (cells - 1) as f32);
                    let lo = src.floor() as usize;
                    (lo, (lo + 1).min(cells - 1), src - lo as f32)
                })
                .collect()
        };
        let xs = axis(width, self.grid.cols);
        let ys = axis(height, self.grid.rows);
        let mut values = Vec::with_capacity(width as usize * height as usize);
        for &(y0, y1, fy) in &ys {
            for &(x0, x1, fx) in &xs {
                let top = self.at(y0, x0) * (1.0 - fx) + self.at(y0, x1) * fx;
                let bottom = self.at(y1, x0) * (1.0 - fx) + self.at(y1, x1) * fx;
                values.push(top * (1.0 - fy) + bottom * fy);
            }
        }
        PixelMap { width, height, values }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upsampling_a_constant_is_constant_and_corners_keep_their_values() {
        let grid = PatchGrid { rows: 2, cols: 3 };
        let flat = PatchMap::new(grid, vec![0.25; 6]).unwrap().upsample(17, 9);
        assert!(flat.values.iter().all(|v| (v - 0.25).abs() < 1e-6));
        let map = PatchMap::new(grid, vec![0.0, 0.5, 1.0, 1.0, 0.5, 0.0]).unwrap();
        let up = map.upsample(30, 20);
        assert_eq!(up.values.len(), 600);
        assert_eq!(up.values[0], 0.0);
        assert_eq!(up.values[29], 1.0);
        assert_eq!(up.values[599], 0.0);
    }

    #[test]
    fn min_max_normalization() {
        let grid = PatchGrid { rows: 1, cols: 3 };
        let map = PatchMap::new(grid, vec![2.0, 4.0, 3.0]).unwrap().min_max_normalized();
        assert_eq!(map.values, vec![0.0, 1.0, 0.5]);
        assert!(PatchMap::new(grid, vec![1.0; 3]).unwrap().min_max_normalized().values.iter().all(|v| *v == 0.0));
    }
}
