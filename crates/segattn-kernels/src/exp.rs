//! The exponentials, e^x for the GELU and 2^x for the softmaxes (whose
//! scores are kept in base 2), and the portable softmax's numerators, in
//! plain arithmetic that the compiler vectorizes for whichever instruction
//! set compiles it; their constants, which the vector kernels share.

/// Adding 1.5·2²³ to a float of magnitude below 2²² rounds it to an
/// integer n (the sum's unit in the last place is 1) and leaves n in the
/// sum's low mantissa bits: one addition, where a rounding instruction (two
/// µops on Intel), or libm's `round` (a call per element), and a conversion
/// to integers would be more.
pub(crate) const ROUNDER: f32 = 12_582_912.0;
/// ln 2 in two parts, the first with few enough bits that n · LN2_HI is
/// exact for the n that the exponentials meet, so that x - n·ln 2 keeps
/// its precision.
pub(crate) const LN2_HI: f32 = 0.693_145_75;
pub(crate) const LN2_LO: f32 = 1.428_606_8e-6;
/// e^f for |f| <= ln 2 / 2, coefficients from degree 5 down to 0 for
/// Horner's rule: the polynomial of least relative error there (found by
/// the Remez exchange), within 2.1e-7 of e^f in f32 arithmetic, where
/// Taylor's series needs degree 6 for as much, an FMA more per value.
pub(crate) const EXP_POLY: [f32; 6] =
    [0.008_297_655, 0.041_915_383, 0.166_675_75, 0.499_988_94, 0.999_999_7, 1.000_000_1];
/// Below this the exponentials give 0. From here up e^x and 2^n are
/// normal floats (e^-87 is 1.4 times the least); a subnormal result would
/// make every product that reads it take a microcode assist on Intel CPUs,
/// a hundred cycles or more each (so would every score more than 87 below
/// its row's largest), while next to a softmax's largest term, 1, it
/// weighs nothing.
pub(crate) const EXP_FLOOR: f32 = -87.0;

/// 2^f for |f| <= 1/2: [`EXP_POLY`] for e^(f·ln 2), each coefficient
/// times its power of ln 2, which keeps the least relative error (scaling
/// the variable does not change it); within 1.8e-7 of 2^f in f32.
pub(crate) const EXP2_POLY: [f32; 6] = {
    let (mut poly, mut power, mut i) = ([0f32; 6], 1f64, EXP_POLY.len());
    while i > 0 {
        i -= 1;
        poly[i] = (EXP_POLY[i] as f64 * power) as f32;
        power *= std::f64::consts::LN_2;
    }
    poly
};
/// 2^x is taken at x no lower than this: the numerators of scores further
/// below their row's largest are 2^-64, not 0. Next to the largest score's
/// 1 that weighs nothing in f32 (whose unit in the last place there is
/// 2^-23), even summed over 10^5 keys; and P·V's products of it with any
/// value above 2^-62 stay normal floats, where a floor nearer f32's least,
/// with most of a peaked row's scores on it, would make those products
/// subnormal, each a microcode assist on Intel CPUs ([`EXP_FLOOR`]): at
/// 2^-125 the stages bench's attention of 785 tokens ran 2.6 times slower.
pub(crate) const EXP2_FLOOR: f32 = -64.0;

/// Abramowitz & Stegun 7.1.26: erfc(a) = t·(a1 + t·(a2 + … + t·a5))·e^-a²
/// for a >= 0, t = 1 / (1 + p·a), to 1.5e-7: p, and a5 down to a1 for
/// Horner's rule.
pub(crate) const ERFC_P: f32 = 0.327_591_1;
pub(crate) const ERFC_POLY: [f32; 5] = [1.061_405_4, -1.453_152, 1.421_413_8, -0.284_496_74, 0.254_829_6];

/// `e^x` for x <= 0 (to 3e-7 relative down to x = -87), and 0 below:
/// never a subnormal ([`EXP_FLOOR`]). x = n·ln 2 + f, e^f by [`EXP_POLY`],
/// times 2^n built in the exponent bits. In plain arithmetic that the
/// compiler vectorizes for whichever instruction set compiles it (no FMAs:
/// without them `mul_add` is a libm call), with n rounded by [`ROUNDER`],
/// which also yields it as an integer: `n as i32` (saturating) compiles to
/// a scalar conversion per element.
#[inline(always)]
pub(crate) fn fast_exp(x: f32) -> f32 {
    let clamped = x.max(EXP_FLOOR);
    let shifted = clamped * std::f32::consts::LOG2_E + ROUNDER;
    let n = shifted - ROUNDER;
    let n_int = shifted.to_bits().wrapping_sub(ROUNDER.to_bits()) as i32;
    let f = (clamped - n * LN2_HI) - n * LN2_LO;
    let p = EXP_POLY[1..].iter().fold(EXP_POLY[0], |p, &c| p * f + c);
    let e = f32::from_bits(((n_int + 127) << 23) as u32) * p;
    if x >= EXP_FLOOR { e } else { 0.0 }
}

/// 2^max(x, [`EXP2_FLOOR`]) for x <= 0, to 2e-7 relative: the softmax
/// numerators of scores kept in base 2 (times log2 e), which need no
/// reduction by ln 2 (two FMAs) and no scaling of x. x = n + f with
/// |f| <= 1/2, n rounded by [`ROUNDER`], 2^f by [`EXP2_POLY`], and n added
/// to its exponent bits: one integer addition, no multiplication.
#[inline(always)]
pub(crate) fn fast_exp2(x: f32) -> f32 {
    let x = x.max(EXP2_FLOOR);
    let shifted = x + ROUNDER;
    let f = x - (shifted - ROUNDER);
    let p = EXP2_POLY[1..].iter().fold(EXP2_POLY[0], |p, &c| p * f + c);
    // The sum's low mantissa bits hold n; shifted into the exponent, they
    // are all of it that stays.
    f32::from_bits(p.to_bits().wrapping_add(shifted.to_bits() << 23))
}

/// Lanes of independent partial results, so reductions vectorize.
pub(crate) const LANES: usize = 16;

/// Softmax of each `tokens`-long row of scores in base 2 (log2 e times the
/// natural ones), short of its last step: leaves 2^(s - max) in the row,
/// never below 2^-64 ([`EXP2_FLOOR`]), and writes 1/Σ to `inv_sums`.
/// Dividing the (rows x head_dim) output by Σ after P·V is head_dim/tokens
/// of the work of dividing every probability (1/19 for ViT-S/16 at
/// 480x640).
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
                *v = fast_exp2(*v - max);
                *s += *v;
            }
        }
        let mut total: f32 = sum.iter().sum();
        for v in chunks.into_remainder() {
            *v = fast_exp2(*v - max);
            total += *v;
        }
        *inv_sum = 1.0 / total;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp2_is_close_to_exp2() {
        // Every 0.01 down to past the floor, and below it.
        let xs = (0..7000).map(|i| -(i as f32) * 0.01);
        for x in xs.chain([-126.0, -1000.0, f32::NEG_INFINITY]) {
            let exact = f64::from(x.max(EXP2_FLOOR)).exp2();
            let fast = fast_exp2(x);
            assert!((f64::from(fast) - exact).abs() <= 2e-7 * exact, "{x}: {fast} vs {exact}");
            assert!(fast.is_normal(), "{x}: {fast} is not a normal float");
        }
    }

    #[test]
    fn fast_exp_is_close_to_exp() {
        for i in 0..1740 {
            let x = -(i as f32) * 0.05;
            let (fast, exact) = (fast_exp(x), x.exp());
            assert!((fast - exact).abs() <= 3e-7 * exact, "{x}: {fast} vs {exact}");
            assert!(fast.is_normal(), "{x}: {fast} is not a normal float");
        }
        for x in [-87.001, -88.0, -1000.0, f32::NEG_INFINITY, f32::NAN] {
            assert_eq!(fast_exp(x).to_bits(), 0, "{x}");
        }
    }
}
