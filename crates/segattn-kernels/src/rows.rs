//! The passes between the matrix products, each one pass over the tokens:
//! softmax numerators, bias + GELU, LayerNorm, and a block's residual
//! update with the LayerNorm after it. Plain loops over lanes of partial
//! results, compiled for the widest vectors the CPU has.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use crate::ShapeError;
use crate::buffers::Unwritten;
use crate::exp::{ERFC_P, ERFC_POLY, LANES, fast_exp, softmax_numerators_portable};

widest_vectors! {
    pub(crate) fn softmax_numerators(scores: &mut [f32], tokens: usize, inv_sums: &mut [f32]) = softmax_numerators_portable
}

/// erf(x) by Abramowitz & Stegun 7.1.26 ([`ERFC_POLY`]: absolute error
/// < 1.5e-7, plus `fast_exp`'s), branch-free so that it vectorizes.
#[inline(always)]
fn fast_erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + ERFC_P * a);
    let poly = t * ERFC_POLY[1..].iter().fold(ERFC_POLY[0], |p, &c| p * t + c);
    (1.0 - poly * fast_exp(-a * a)).copysign(x)
}

/// tanh(x) through one `fast_exp` of a non-positive argument.
#[inline(always)]
fn fast_tanh(x: f32) -> f32 {
    let e = fast_exp(-2.0 * x.abs());
    ((1.0 - e) / (1.0 + e)).copysign(x)
}

/// GELU(x): the exact (erf) form, or the tanh approximation.
#[inline(always)]
pub(crate) fn gelu(x: f32, exact: bool) -> f32 {
    if exact {
        0.5 * x * (1.0 + fast_erf(x * std::f32::consts::FRAC_1_SQRT_2))
    } else {
        0.5 * x * (1.0 + fast_tanh(0.797_884_6 * (x + 0.044_715 * x * x * x)))
    }
}

#[inline(always)]
fn bias_gelu_portable(values: &mut [f32], bias: &[f32], exact: bool) {
    for row in values.chunks_mut(bias.len()) {
        for (v, b) in row.iter_mut().zip(bias) {
            *v = gelu(*v + b, exact);
        }
    }
}

widest_vectors! {
    fn bias_gelu_widest(values: &mut [f32], bias: &[f32], exact: bool) = bias_gelu_portable
}

/// The erf form, which every DINO checkpoint uses, in the tiles' vector
/// instructions where the CPU has them: in FMAs, and with no sign put back,
/// where the plain loop (which cannot use FMAs on every CPU it is compiled
/// for) multiplies and adds apart.
pub(crate) fn bias_gelu_rows(values: &mut [f32], bias: &[f32], exact: bool) {
    #[cfg(target_arch = "x86_64")]
    if let (true, Some(isa)) = (exact, crate::simd::widest()) {
        return crate::simd::bias_gelu_erf(isa, values, bias);
    }
    bias_gelu_widest(values, bias, exact)
}

/// Rows per parallel task: enough to amortize the task, few enough to share.
const ROWS_PER_TASK: usize = 32;

/// GELU(x + bias) over the rows of `values` (…, bias.len()), in place, in
/// parallel: the exact (erf) form, or the tanh approximation.
pub fn bias_gelu(values: &mut [f32], bias: &[f32], exact: bool) {
    values.par_chunks_mut(bias.len().max(1) * ROWS_PER_TASK).for_each(|rows| bias_gelu_rows(rows, bias, exact));
}

/// A LayerNorm's parameters: `(x - mean) / sqrt(var + eps) · weight + bias`
/// over rows of `weight.len()` values.
#[derive(Clone, Copy, Debug)]
pub struct Norm<'a> {
    pub weight: &'a [f32],
    pub bias: &'a [f32],
    pub eps: f32,
}

/// What is added to the residual stream: `γ·(update + bias)`, γ the layer scale if any.
struct Update<'a> {
    bias: &'a [f32],
    gamma: Option<&'a [f32]>,
}

/// Normalizes `x` into `normed`, writing every value of it.
#[inline(always)]
fn norm_row(x: &[f32], normed: &mut [MaybeUninit<f32>], norm: &Norm) {
    // Two passes over a row that is in L1: the mean, then the centred
    // variance, which stays exact where E[x²] - E[x]² would cancel.
    let width = x.len() as f32;
    let mean = lane_sum(x, |v| v) / width;
    let inv_std = 1.0 / (lane_sum(x, |v| (v - mean) * (v - mean)) / width + norm.eps).sqrt();
    for (((n, v), w), b) in normed.iter_mut().zip(x).zip(norm.weight).zip(norm.bias) {
        n.write((v - mean) * inv_std * w + b);
    }
}

/// Σ f(v) over `values`, in [`LANES`] partial sums. Over whole chunks of
/// them, the sums stay in vector registers; over chunks that may be short,
/// they went through the stack at every step, a store and a load on each
/// sum's chain, and the LayerNorm ran at a third of the speed.
#[inline(always)]
fn lane_sum(values: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut sums = [0f32; LANES];
    let chunks = values.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        sums.iter_mut().zip(chunk).for_each(|(s, &v)| *s += f(v));
    }
    sums.iter_mut().zip(rest).for_each(|(s, &v)| *s += f(v));
    sums.iter().sum()
}

#[inline(always)]
fn norm_rows_portable(x: &[f32], normed: &mut [MaybeUninit<f32>], norm: &Norm) {
    let width = norm.weight.len();
    for (x, normed) in x.chunks(width).zip(normed.chunks_mut(width)) {
        norm_row(x, normed, norm);
    }
}

widest_vectors! {
    fn norm_rows(x: &[f32], normed: &mut [MaybeUninit<f32>], norm: &Norm) = norm_rows_portable
}

/// `sum` holds the update on entry and `x + γ·(update + bias)` on return;
/// each of its rows is then normalized into `normed`.
#[inline(always)]
fn residual_norm_rows_portable(
    x: &[f32],
    sum: &mut [f32],
    normed: &mut [MaybeUninit<f32>],
    update: &Update,
    norm: &Norm,
) {
    let width = norm.weight.len();
    for ((x, sum), normed) in x.chunks(width).zip(sum.chunks_mut(width)).zip(normed.chunks_mut(width)) {
        match &update.gamma {
            Some(gamma) => {
                for (((s, x), b), g) in sum.iter_mut().zip(x).zip(update.bias).zip(*gamma) {
                    *s = x + g * (*s + b);
                }
            }
            None => {
                for ((s, x), b) in sum.iter_mut().zip(x).zip(update.bias) {
                    *s = x + (*s + b);
                }
            }
        }
        norm_row(sum, normed, norm);
    }
}

widest_vectors! {
    fn residual_norm_rows(x: &[f32], sum: &mut [f32], normed: &mut [MaybeUninit<f32>], update: &Update, norm: &Norm)
        = residual_norm_rows_portable
}

/// LayerNorm of each row of `x`.
pub fn layer_norm(x: &[f32], norm: Norm) -> Result<Vec<f32>, ShapeError> {
    let width = norm.weight.len();
    if width == 0 || !x.len().is_multiple_of(width) || norm.bias.len() != width {
        return Err(ShapeError::new(format!(
            "layer_norm: {} values, weight {width}, bias {}",
            x.len(),
            norm.bias.len()
        )));
    }
    let chunk = width * ROWS_PER_TASK;
    let mut normed = Unwritten::new(x.len());
    let tasks = x.par_chunks(chunk).zip(normed.slots().par_chunks_mut(chunk));
    tasks.for_each(|(x, normed)| norm_rows(x, normed, &norm));
    // SAFETY: the chunks cover all x.len() values and `norm_row` writes each.
    Ok(unsafe { normed.assume_written() })
}

/// The residual update `x + γ·(update + bias)` (γ: the layer scale, if any)
/// and the LayerNorm that reads it next, in one pass. `update` has `x`'s
/// length and becomes the new `x`; returns its normalized copy.
pub fn residual_layer_norm(
    x: &[f32],
    update: &mut [f32],
    bias: &[f32],
    gamma: Option<&[f32]>,
    norm: Norm,
) -> Result<Vec<f32>, ShapeError> {
    let width = norm.weight.len();
    let widths_agree = bias.len() == width && gamma.is_none_or(|g| g.len() == width) && norm.bias.len() == width;
    if width == 0 || update.len() != x.len() || !x.len().is_multiple_of(width) || !widths_agree {
        return Err(ShapeError::new(format!(
            "residual_layer_norm: {} values and an update of {}, rows of {width}",
            x.len(),
            update.len()
        )));
    }
    let residual = Update { bias, gamma };
    let chunk = width * ROWS_PER_TASK;
    let mut normed = Unwritten::new(x.len());
    let tasks = (x.par_chunks(chunk).zip(update.par_chunks_mut(chunk))).zip(normed.slots().par_chunks_mut(chunk));
    tasks.for_each(|((x, sum), normed)| residual_norm_rows(x, sum, normed, &residual, &norm));
    // SAFETY: the chunks cover all x.len() values and `norm_row` writes each.
    Ok(unsafe { normed.assume_written() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_numerators_over_their_sums_match_the_exact_formula_in_base_2() {
        let tokens = 37;
        let mut scores: Vec<f32> = (0..3 * tokens).map(|i| ((i * 7919) % 97) as f32 * 0.3 - 10.0).collect();
        let expected: Vec<f32> = scores
            .chunks(tokens)
            .flat_map(|row| {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum: f32 = row.iter().map(|v| (v - max).exp2()).sum();
                row.iter().map(move |v| (v - max).exp2() / sum).collect::<Vec<_>>()
            })
            .collect();
        let mut inv_sums = [0f32; 3];
        softmax_numerators(&mut scores, tokens, &mut inv_sums);
        let ours = scores.chunks(tokens).zip(inv_sums).flat_map(|(row, inv)| row.iter().map(move |p| p * inv));
        for (a, b) in ours.zip(&expected) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn residual_layer_norm_matches_the_formula() {
        // Widths below, at and past a vector; one row and many.
        for width in [1, 7, 16, 17, 64, 129] {
            for rows in [1, 3, 37] {
                for scaled in [false, true] {
                    let values = |seed: f32, n: usize| -> Vec<f32> {
                        (0..n).map(|i| (i as f32 * 0.37 + seed).sin() * 3.0).collect()
                    };
                    let x = values(0.1, rows * width);
                    let update = values(0.7, rows * width);
                    let (bias, gamma) = (values(1.3, width), values(2.9, width));
                    let (weight, shift) = (values(4.1, width), values(5.3, width));
                    let norm = Norm { weight: &weight, bias: &shift, eps: 1e-6 };
                    let mut sum = update.clone();
                    let normed = residual_layer_norm(&x, &mut sum, &bias, scaled.then_some(&gamma[..]), norm).unwrap();
                    for r in 0..rows {
                        let row: Vec<f32> = (0..width)
                            .map(|c| {
                                let i = r * width + c;
                                x[i] + if scaled { gamma[c] } else { 1.0 } * (update[i] + bias[c])
                            })
                            .collect();
                        let mean = row.iter().sum::<f32>() / width as f32;
                        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / width as f32;
                        for c in 0..width {
                            let expected_norm = (row[c] - mean) / (var + 1e-6).sqrt() * weight[c] + shift[c];
                            let (s, n) = (sum[r * width + c], normed[r * width + c]);
                            let at = format!("width {width}, {rows} rows, scaled {scaled}, ({r}, {c})");
                            assert!((s - row[c]).abs() < 1e-5, "{at}: sum {s} vs {}", row[c]);
                            assert!((n - expected_norm).abs() < 1e-4, "{at}: normed {n} vs {expected_norm}");
                        }
                    }
                }
            }
        }
    }
}
