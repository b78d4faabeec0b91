//! The exponential, and the softmax numerators built on it, in plain
//! arithmetic that the compiler vectorizes for whichever instruction set
//! compiles it: the GELU's, the portable softmax and the AVX2 tiles' use it.

/// `e^x` for x <= 0 (to 5e-6 relative error down to x = -87), and 0 below:
/// never a subnormal, which would slow every operation that reads it on
/// Intel CPUs (as `simd`'s `EXP_FLOOR` explains). In plain arithmetic that
/// the compiler vectorizes: libm's `expf` is a call per element, and so is
/// `round`, hence the 1.5·2²³ rounding trick. It also yields n as an
/// integer in the low mantissa bits, because `n as i32` (saturating)
/// compiles to a scalar conversion per element.
#[inline(always)]
pub(crate) fn fast_exp(x: f32) -> f32 {
    const ROUNDER: f32 = 12_582_912.0;
    const FLOOR: f32 = -87.0;
    let y = x.max(FLOOR) * std::f32::consts::LOG2_E;
    let shifted = y + ROUNDER;
    let n = shifted - ROUNDER;
    let n_int = shifted.to_bits().wrapping_sub(ROUNDER.to_bits()) as i32;
    let f = y - n;
    // 2^f on [-0.5, 0.5]: Taylor series of e^(f·ln 2) to degree 6.
    let p = 1.0
        + f * (std::f32::consts::LN_2
            + f * (0.240_226_5 + f * (0.055_504_11 + f * (0.009_618_129 + f * (0.001_333_355 + f * 0.000_154_035_3)))));
    let e = f32::from_bits(((n_int + 127) << 23) as u32) * p;
    if x >= FLOOR { e } else { 0.0 }
}

/// Lanes of independent partial results, so reductions vectorize.
pub(crate) const LANES: usize = 16;

/// Softmax of each `tokens`-long row, short of its last step: leaves
/// e^(s - max) in the row and writes 1/Σ to `inv_sums`. Dividing the
/// (rows x head_dim) output by Σ after P·V is head_dim/tokens of the work
/// of dividing every probability (1/19 for ViT-S/16 at 480x640).
#[inline(always)]
pub(crate) fn softmax_numerators_portable(scores: &mut [f32], tokens: usize, inv_sums: &mut [f32]) {
    for (row, inv_sum) in scores.chunks_mut(tokens).zip(inv_sums) {
        let mut max = [f32::NEG_INFINITY; LANES];
        let mut chunks = row.chunks_exact(LANES);
        for chunk in &mut chunks {
            for (m, &v) in max.iter_mut().zip(chunk) {
                *m = if v > *m { v } else { *m };
            }
        }
        let max = chunks.remainder().iter().chain(&max).copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = [0f32; LANES];
        let mut chunks = row.chunks_exact_mut(LANES);
        for chunk in &mut chunks {
            for (s, v) in sum.iter_mut().zip(chunk.iter_mut()) {
                *v = fast_exp(*v - max);
                *s += *v;
            }
        }
        let mut total: f32 = sum.iter().sum();
        for v in chunks.into_remainder() {
            *v = fast_exp(*v - max);
            total += *v;
        }
        *inv_sum = 1.0 / total;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_close_to_exp() {
        for i in 0..1740 {
            let x = -(i as f32) * 0.05;
            let (fast, exact) = (fast_exp(x), x.exp());
            // Relative error grows with |x| from rounding x·log2(e) in f32.
            assert!((fast - exact).abs() <= 5e-6 * exact, "{x}: {fast} vs {exact}");
            assert!(fast.is_normal(), "{x}: {fast} is not a normal float");
        }
        for x in [-87.001, -88.0, -1000.0, f32::NEG_INFINITY, f32::NAN] {
            assert_eq!(fast_exp(x).to_bits(), 0, "{x}");
        }
    }
}
