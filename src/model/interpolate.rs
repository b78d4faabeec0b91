//! Bicubic resampling of the position-embedding grid, reproducing PyTorch's
//! `F.interpolate(mode="bicubic", align_corners=False)` exactly, because a
//! checkpoint's position embeddings only mean what they meant in training
//! when they are resampled the way the reference resamples them.
//!
//! Resampling is separable, so each axis becomes an `out x in` matrix and the
//! grid is resampled as `rows · grid · colsᵀ`.

use candle_core::{Device, Result, Tensor};

/// How a checkpoint's reference implementation resizes its position grid.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PosInterpolation {
    /// `interpolate(size=...)`: Hugging Face `ViTModel` and `Dinov2Model`.
    Size,
    /// `interpolate(size=..., antialias=True)`: DINOv2 with registers.
    SizeAntialias,
    /// `interpolate(scale_factor=(n + offset) / N)`: the original DINO and
    /// DINOv2 repositories (offset 0.1, a historical fix for rounding).
    ScaleOffset(f64),
}

/// Keys' cubic convolution kernel with PyTorch's A = -0.75.
fn keys_cubic(x: f64) -> f64 {
    const A: f64 = -0.75;
    let x = x.abs();
    if x <= 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
    } else {
        0.0
    }
}

/// The antialiasing bicubic filter (PIL's, A = -0.5).
fn antialias_cubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Plain bicubic: four taps around the source coordinate, clamped at borders.
fn cubic_matrix(input: usize, output: usize, scale: f64) -> Vec<f64> {
    let mut m = vec![0.0; output * input];
    for o in 0..output {
        let src = scale * (o as f64 + 0.5) - 0.5;
        let base = src.floor();
        let t = src - base;
        let taps = [keys_cubic(t + 1.0), keys_cubic(t), keys_cubic(1.0 - t), keys_cubic(2.0 - t)];
        for (k, w) in taps.iter().enumerate() {
            let i = (base as i64 - 1 + k as i64).clamp(0, input as i64 - 1) as usize;
            m[o * input + i] += w;
        }
    }
    m
}

/// Antialiased bicubic: the filter is stretched by the scale when shrinking
/// and the taps that fall inside the input are renormalized.
fn antialias_matrix(input: usize, output: usize) -> Vec<f64> {
    let scale = input as f64 / output as f64;
    let (support, inv_scale) = if scale >= 1.0 { (2.0 * scale, 1.0 / scale) } else { (2.0, 1.0) };
    let mut m = vec![0.0; output * input];
    for o in 0..output {
        let center = scale * (o as f64 + 0.5);
        // Truncation toward zero, as the C++ cast does.
        let lo = ((center - support + 0.5) as i64).max(0) as usize;
        let hi = ((center + support + 0.5) as i64).min(input as i64) as usize;
        let row = &mut m[o * input..(o + 1) * input];
        for (j, w) in row.iter_mut().enumerate().take(hi).skip(lo) {
            *w = antialias_cubic((j as f64 - center + 0.5) * inv_scale);
        }
        let total: f64 = row.iter().sum();
        if total != 0.0 {
            row.iter_mut().for_each(|w| *w /= total);
        }
    }
    m
}

/// The `output x input` matrix that resamples one axis.
pub fn resample_matrix(input: usize, output: usize, mode: PosInterpolation) -> Vec<f64> {
    match mode {
        PosInterpolation::Size => cubic_matrix(input, output, input as f64 / output as f64),
        PosInterpolation::SizeAntialias => antialias_matrix(input, output),
        PosInterpolation::ScaleOffset(offset) => cubic_matrix(input, output, input as f64 / (output as f64 + offset)),
    }
}

/// Resamples `grid` of shape (channels, in_rows, in_cols) to (channels, rows, cols).
pub fn resample_grid(grid: &Tensor, rows: usize, cols: usize, mode: PosInterpolation) -> Result<Tensor> {
    let (_, in_rows, in_cols) = grid.dims3()?;
    let as_tensor = |input: usize, output: usize, device: &Device| {
        let m: Vec<f32> = resample_matrix(input, output, mode).iter().map(|&w| w as f32).collect();
        Tensor::from_vec(m, (output, input), device)
    };
    let row_matrix = as_tensor(in_rows, rows, grid.device())?;
    let col_matrix = as_tensor(in_cols, cols, grid.device())?;
    row_matrix.broadcast_matmul(grid)?.broadcast_matmul(&col_matrix.t()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_size_plain_bicubic_is_identity() {
        let m = resample_matrix(5, 5, PosInterpolation::Size);
        for o in 0..5 {
            for i in 0..5 {
                let expected = if o == i { 1.0 } else { 0.0 };
                assert!((m[o * 5 + i] - expected).abs() < 1e-12, "({o},{i}) = {}", m[o * 5 + i]);
            }
        }
    }

    #[test]
    fn every_row_sums_to_one() {
        for mode in [PosInterpolation::Size, PosInterpolation::SizeAntialias, PosInterpolation::ScaleOffset(0.1)] {
            for (input, output) in [(5, 3), (5, 8), (37, 60), (4, 1)] {
                let m = resample_matrix(input, output, mode);
                for row in m.chunks(input) {
                    let sum: f64 = row.iter().sum();
                    assert!((sum - 1.0).abs() < 1e-9, "{mode:?} {input}->{output}: {sum}");
                }
            }
        }
    }
}
