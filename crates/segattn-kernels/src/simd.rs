//! The vector operations the register-tile kernels are written in, once for
//! AVX-512 and once for AVX2 + FMA (most laptop CPUs), so that one generic
//! kernel serves both.

use std::arch::x86_64::*;

use crate::exp::{ERFC_P, ERFC_POLY, EXP2_FLOOR, EXP2_POLY, ROUNDER};

/// A vector instruction set that this CPU has and [`crate::set_limit`] allows.
/// Only [`widest`] and [`usable`] make one, after detection, so holding an
/// `Isa` is what lets a kernel compiled for it run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Isa(Width);

/// The instruction sets the tiles are written for, in order of width.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Width {
    Avx2,
    Avx512,
}

/// The widest instruction set the tiles may use: the CPU's, capped by
/// [`crate::set_limit`], so that every path can be tested on one machine.
/// Decided once per process.
pub(crate) fn widest() -> Option<Isa> {
    static WIDEST: std::sync::OnceLock<Option<Isa>> = std::sync::OnceLock::new();
    *WIDEST.get_or_init(|| {
        let cap = match crate::limit() {
            crate::Limit::Portable => None,
            crate::Limit::Avx2 => Some(Width::Avx2),
            crate::Limit::Widest => Some(Width::Avx512),
        };
        let cpu = if is_x86_feature_detected!("avx512f") {
            Some(Width::Avx512)
        } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            Some(Width::Avx2)
        } else {
            None
        };
        cpu.min(cap).map(Isa)
    })
}

/// Every instruction set the tiles may use here, the narrower ones too.
#[cfg(test)]
pub(crate) fn usable() -> impl Iterator<Item = Isa> {
    [Width::Avx2, Width::Avx512].into_iter().map(Isa).filter(|&isa| Some(isa) <= widest())
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.0 {
            Width::Avx2 => "AVX2",
            Width::Avx512 => "AVX-512",
        })
    }
}

impl Isa {
    pub(crate) fn width(self) -> Width {
        self.0
    }
}

/// One vector register of floats.
///
/// # Safety
/// Every method needs the CPU to have the instruction set, which callers
/// establish by running the kernel inside [`Vector::enter`].
pub(crate) trait Vector: Copy {
    const LANES: usize;
    /// Panels, one vector wide each, that a six-row tile spans: its 6 x P
    /// accumulators, P panel vectors and a broadcast must fit the vector
    /// registers.
    const TILE_PANELS: usize;

    /// Runs `kernel` compiled for this instruction set (write it
    /// `#[inline(always)] || ...`, so that all of it is).
    unsafe fn enter<T>(kernel: impl FnOnce() -> T) -> T;
    unsafe fn zero() -> Self;
    unsafe fn splat(x: f32) -> Self;
    unsafe fn load(from: *const f32) -> Self;
    unsafe fn store(self, to: *mut f32);
    /// Stores the first `lanes` lanes only.
    unsafe fn store_first(self, to: *mut f32, lanes: usize);
    /// The product step of a tile: self · b + acc, in one rounding, for
    /// vectors of floats; for [`Bf16Pairs`], acc plus the dot product of
    /// each lane's pair.
    unsafe fn mul_add(self, b: Self, acc: Self) -> Self;
    /// GELU (the erf form) of a product's sums, lane by lane, as a tile
    /// stores them: [`gelu`].
    unsafe fn gelu_of_sums(self) -> Self;
}

/// A vector whose lanes are f32s, for the steps that read them as numbers:
/// all but [`Bf16Pairs`].
///
/// # Safety
/// As [`Vector`].
pub(crate) trait FloatLanes: Vector {
    /// Vectors the softmax pass ([`exp2_sum`]) takes a step, each with a
    /// sum of its own: as many as the registers hold beside the
    /// exponential's ten constants and temporaries, since a sum that
    /// spills makes a round trip through the stack at every step.
    const SOFTMAX_WAYS: usize;
    unsafe fn mul(self, b: Self) -> Self;
    unsafe fn add(self, b: Self) -> Self;
    unsafe fn sub(self, b: Self) -> Self;
    unsafe fn div(self, b: Self) -> Self;
    unsafe fn max(self, b: Self) -> Self;
    unsafe fn abs(self) -> Self;
    /// p · 2^n per lane, for whole numbers n given as floats and as
    /// `shifted`, n + [`ROUNDER`], whose low mantissa bits hold n: the
    /// last step of [`FloatLanes::exp2`].
    unsafe fn times_exp2(p: Self, n: Self, shifted: Self) -> Self;
    /// 2^max(x, [`EXP2_FLOOR`]) per lane for x <= 0, as
    /// [`crate::exp::fast_exp2`] computes it: x clamped to the floor, n
    /// rounded by [`ROUNDER`], 2^(x - n) by [`EXP2_POLY`], times 2^n.
    #[inline(always)]
    unsafe fn exp2(self) -> Self {
        // SAFETY: the caller's contract.
        unsafe {
            let x = self.max(Self::splat(EXP2_FLOOR));
            let shifted = x.add(Self::splat(ROUNDER));
            let n = shifted.sub(Self::splat(ROUNDER));
            let f = x.sub(n);
            let mut p = Self::splat(EXP2_POLY[0]);
            for c in &EXP2_POLY[1..] {
                p = p.mul_add(f, Self::splat(*c));
            }
            Self::times_exp2(p, n, shifted)
        }
    }
    /// The first `lanes` values from `from`, reading no further; `fill`
    /// in the rest.
    unsafe fn load_first(from: *const f32, lanes: usize, fill: f32) -> Self;
    unsafe fn reduce_add(self) -> f32;
    unsafe fn reduce_max(self) -> f32;
}

/// A softmax's numerators 2^(s · scale - max) in place of the products s
/// of `row`, `scale` taking them to scores in base 2 (log2 e times the
/// natural ones), and returns their sum. Scaled here, in the FMA that
/// subtracts the largest score, the products are stored as they come out
/// of the tiles, with no multiply each.
/// Dividing the (rows x head_dim) output by the sum after P·V is
/// head_dim/tokens of the work of dividing every probability. A step of
/// [`FloatLanes::SOFTMAX_WAYS`] vectors keeps as many sums apart; a last
/// partial vector is read and written lane by lane, its other lanes -∞,
/// whose 2^x (the floor's, 2^-64) is lost in a sum that holds the largest
/// score's 1.
///
/// # Safety
/// V's instruction set.
#[inline(always)]
pub(crate) unsafe fn exp2_sum<V: FloatLanes>(row: &mut [f32], scale: f32, max: f32) -> f32 {
    let (len, at) = (row.len(), row.as_mut_ptr());
    let full = len - len % V::LANES;
    let step = V::SOFTMAX_WAYS * V::LANES;
    // SAFETY: V's instruction set by the caller's contract; every full
    // vector is below `full`, and the last partial one reads and writes
    // only its `len - full` lanes.
    unsafe {
        let (scale, minus_max) = (V::splat(scale), V::splat(-max));
        const { assert!(V::SOFTMAX_WAYS <= 4) };
        let mut sum = [V::zero(); 4];
        let mut i = 0;
        while i + step <= full {
            for (j, sum) in sum[..V::SOFTMAX_WAYS].iter_mut().enumerate() {
                let e = V::load(at.add(i + j * V::LANES)).mul_add(scale, minus_max).exp2();
                e.store(at.add(i + j * V::LANES));
                *sum = sum.add(e);
            }
            i += step;
        }
        for i in (i..full).step_by(V::LANES) {
            let e = V::load(at.add(i)).mul_add(scale, minus_max).exp2();
            e.store(at.add(i));
            sum[0] = sum[0].add(e);
        }
        // A masked load and store cost tens of cycles on AMD's CPUs even
        // with no lane to move: a row of whole vectors (every step but a
        // row's last) skips them.
        if full < len {
            let e = V::load_first(at.add(full), len - full, f32::NEG_INFINITY).mul_add(scale, minus_max).exp2();
            e.store_first(at.add(full), len - full);
            sum[1] = sum[1].add(e);
        }
        sum[0].add(sum[1]).add(sum[2].add(sum[3])).reduce_add()
    }
}

/// Asks for the cache line holding `at` ahead of its use. A hint: it never
/// faults, whatever the address, so any pointer will do.
#[inline(always)]
pub(crate) fn prefetch(at: *const f32) {
    // SAFETY: SSE is part of x86-64; a prefetch reads nothing the program
    // sees and faults on no address.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(at.cast()) }
}

/// GELU(x + bias) in the erf form over the rows of `values` (…,
/// bias.len()), in place, in `isa`'s vectors.
pub(crate) fn bias_gelu_erf(isa: Isa, values: &mut [f32], bias: &[f32]) {
    // Inlined into `enter`, so compiled for V's instruction set.
    #[inline(always)]
    fn rows<V: FloatLanes>(values: &mut [f32], bias: &[f32]) {
        let width = bias.len();
        if width == 0 {
            return;
        }
        let full = width - width % V::LANES;
        for row in values.chunks_exact_mut(width) {
            let at = row.as_mut_ptr();
            // SAFETY: (all pointer reads and writes) V's instruction set, as
            // `bias_gelu_erf`'s `Isa` says; every full vector is below
            // `full`, and the last partial one reads and writes only its
            // `width - full` lanes of the row and of the bias.
            unsafe {
                for i in (0..full).step_by(V::LANES) {
                    gelu(V::load(at.add(i)).add(V::load(bias.as_ptr().add(i)))).store(at.add(i));
                }
                let tail = width - full;
                let x = V::load_first(at.add(full), tail, 0.0).add(V::load_first(bias.as_ptr().add(full), tail, 0.0));
                gelu(x).store_first(at.add(full), tail);
            }
        }
    }
    match isa.width() {
        // SAFETY: an `Isa` is made only for an instruction set the CPU has.
        Width::Avx2 => unsafe {
            Avx2::enter(
                #[inline(always)]
                || rows::<Avx2>(values, bias),
            )
        },
        // SAFETY: as above.
        Width::Avx512 => unsafe {
            Avx512::enter(
                #[inline(always)]
                || rows::<Avx512>(values, bias),
            )
        },
    }
}

/// GELU(x) = x·Φ(x) = x·(1 + erf(x/√2))/2, as max(x, 0) - |x|·erfc(|x|/√2)/2
/// (the same for either sign of x, so no sign is put back), erfc by
/// [`ERFC_POLY`] in FMAs: one division and one exponential a vector. The
/// constants are folded: 1/√2 into p, -1/2 into the polynomial, and
/// e^(-x²/2) taken as 2^(-x²·log2(e)/2), which needs no reduction by ln 2.
///
/// # Safety
/// V's instruction set.
#[inline(always)]
unsafe fn gelu<V: FloatLanes>(x: V) -> V {
    const P: f32 = ERFC_P * std::f32::consts::FRAC_1_SQRT_2;
    const MINUS_HALF_POLY: [f32; 5] = {
        let (mut poly, mut i) = ([0f32; 5], 0);
        while i < 5 {
            poly[i] = -0.5 * ERFC_POLY[i];
            i += 1;
        }
        poly
    };
    // SAFETY: the caller's contract.
    unsafe {
        let magnitude = x.abs();
        let t = V::splat(1.0).div(magnitude.mul_add(V::splat(P), V::splat(1.0)));
        let mut poly = V::splat(MINUS_HALF_POLY[0]);
        for c in &MINUS_HALF_POLY[1..] {
            poly = poly.mul_add(t, V::splat(*c));
        }
        // Below the exponential's floor (|x| > 9.4) e^-x²/2 is taken as
        // 2^-64, and GELU(x) is max(x, 0) to far below f32's resolution.
        let gaussian = x.mul(x).mul(V::splat(-0.5 * std::f32::consts::LOG2_E)).exp2();
        let minus_half_erfc = poly.mul(t).mul(gaussian);
        magnitude.mul_add(minus_half_erfc, x.max(V::zero()))
    }
}

#[derive(Clone, Copy)]
pub(crate) struct Avx512(__m512);

// SAFETY (all methods): the caller runs them on a CPU with AVX-512F.
impl Vector for Avx512 {
    const LANES: usize = 16;
    /// 6 x 4 + 4 + 1 of the 32 registers.
    const TILE_PANELS: usize = 4;

    #[target_feature(enable = "avx512f")]
    unsafe fn enter<T>(kernel: impl FnOnce() -> T) -> T {
        kernel()
    }
    #[inline(always)]
    unsafe fn zero() -> Self {
        unsafe { Self(_mm512_setzero_ps()) }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        unsafe { Self(_mm512_set1_ps(x)) }
    }
    #[inline(always)]
    unsafe fn load(from: *const f32) -> Self {
        unsafe { Self(_mm512_loadu_ps(from)) }
    }
    #[inline(always)]
    unsafe fn store(self, to: *mut f32) {
        unsafe { _mm512_storeu_ps(to, self.0) }
    }
    #[inline(always)]
    unsafe fn store_first(self, to: *mut f32, lanes: usize) {
        let mask: __mmask16 = if lanes >= 16 { !0 } else { (1 << lanes) - 1 };
        unsafe { _mm512_mask_storeu_ps(to, mask, self.0) }
    }
    #[inline(always)]
    unsafe fn mul_add(self, b: Self, acc: Self) -> Self {
        unsafe { Self(_mm512_fmadd_ps(self.0, b.0, acc.0)) }
    }
    #[inline(always)]
    unsafe fn gelu_of_sums(self) -> Self {
        unsafe { gelu(self) }
    }
}

// SAFETY (all methods): as above.
impl FloatLanes for Avx512 {
    const SOFTMAX_WAYS: usize = 4;
    #[inline(always)]
    unsafe fn mul(self, b: Self) -> Self {
        unsafe { Self(_mm512_mul_ps(self.0, b.0)) }
    }
    #[inline(always)]
    unsafe fn add(self, b: Self) -> Self {
        unsafe { Self(_mm512_add_ps(self.0, b.0)) }
    }
    #[inline(always)]
    unsafe fn sub(self, b: Self) -> Self {
        unsafe { Self(_mm512_sub_ps(self.0, b.0)) }
    }
    #[inline(always)]
    unsafe fn div(self, b: Self) -> Self {
        unsafe { Self(_mm512_div_ps(self.0, b.0)) }
    }
    #[inline(always)]
    unsafe fn max(self, b: Self) -> Self {
        unsafe { Self(_mm512_max_ps(self.0, b.0)) }
    }
    #[inline(always)]
    unsafe fn abs(self) -> Self {
        unsafe { Self(_mm512_abs_ps(self.0)) }
    }
    /// 2^n by `vscalefps`.
    #[inline(always)]
    unsafe fn times_exp2(p: Self, n: Self, _: Self) -> Self {
        unsafe { Self(_mm512_scalef_ps(p.0, n.0)) }
    }
    #[inline(always)]
    unsafe fn load_first(from: *const f32, lanes: usize, fill: f32) -> Self {
        let mask: __mmask16 = if lanes >= 16 { !0 } else { (1 << lanes) - 1 };
        unsafe { Self(_mm512_mask_loadu_ps(_mm512_set1_ps(fill), mask, from)) }
    }
    #[inline(always)]
    unsafe fn reduce_add(self) -> f32 {
        unsafe { _mm512_reduce_add_ps(self.0) }
    }
    #[inline(always)]
    unsafe fn reduce_max(self) -> f32 {
        unsafe { _mm512_reduce_max_ps(self.0) }
    }
}

#[derive(Clone, Copy)]
pub(crate) struct Avx2(__m256);

// SAFETY (all methods): the caller runs them on a CPU with AVX2 and FMA.
impl Vector for Avx2 {
    const LANES: usize = 8;
    /// 6 x 2 + 2 + 1 of the 16 registers.
    const TILE_PANELS: usize = 2;

    #[target_feature(enable = "avx2,fma")]
    unsafe fn enter<T>(kernel: impl FnOnce() -> T) -> T {
        kernel()
    }
    #[inline(always)]
    unsafe fn zero() -> Self {
        unsafe { Self(_mm256_setzero_ps()) }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        unsafe { Self(_mm256_set1_ps(x)) }
    }
    #[inline(always)]
    unsafe fn load(from: *const f32) -> Self {
        unsafe { Self(_mm256_loadu_ps(from)) }
    }
    #[inline(always)]
    unsafe fn store(self, to: *mut f32) {
        unsafe { _mm256_storeu_ps(to, self.0) }
    }
    #[inline(always)]
    unsafe fn store_first(self, to: *mut f32, lanes: usize) {
        if lanes >= 8 {
            // SAFETY: the caller's contract.
            return unsafe { self.store(to) };
        }
        unsafe { _mm256_maskstore_ps(to, avx2_first_lanes(lanes), self.0) }
    }
    #[inline(always)]
    unsafe fn mul_add(self, b: Self, acc: Self) -> Self {
        unsafe { Self(_mm256_fmadd_ps(self.0, b.0, acc.0)) }
    }
    #[inline(always)]
    unsafe fn gelu_of_sums(self) -> Self {
        unsafe { gelu(self) }
    }
}

// SAFETY (all methods): as above.
impl FloatLanes for Avx2 {
    /// Four spilled one of their sums on 16 registers.
    const SOFTMAX_WAYS: usize = 2;
    #[inline(always)]
    unsafe fn mul(self, b: Self) -> Self {
        unsafe { Self(_mm256_mul_ps(self.0, b.0)) }
    }
    #[inline(always)]
    unsafe fn add(self, b: Self) -> Self {
        unsafe { Self(_mm256_add_ps(self.0, b.0)) }
    }
    #[inline(always)]
    unsafe fn sub(self, b: Self) -> Self {
        unsafe { Self(_mm256_sub_ps(self.0, b.0)) }
    }
    #[inline(always)]
    unsafe fn div(self, b: Self) -> Self {
        unsafe { Self(_mm256_div_ps(self.0, b.0)) }
    }
    #[inline(always)]
    unsafe fn max(self, b: Self) -> Self {
        unsafe { Self(_mm256_max_ps(self.0, b.0)) }
    }
    #[inline(always)]
    unsafe fn abs(self) -> Self {
        unsafe { Self(_mm256_and_ps(self.0, _mm256_castsi256_ps(_mm256_set1_epi32(i32::MAX)))) }
    }
    /// n added to 2^f's exponent bits: no multiplication, as
    /// [`crate::exp::fast_exp2`] does.
    #[inline(always)]
    unsafe fn times_exp2(p: Self, _: Self, shifted: Self) -> Self {
        unsafe {
            let n_bits = _mm256_slli_epi32::<23>(_mm256_castps_si256(shifted.0));
            Self(_mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p.0), n_bits)))
        }
    }
    #[inline(always)]
    unsafe fn load_first(from: *const f32, lanes: usize, fill: f32) -> Self {
        unsafe {
            let mask = avx2_first_lanes(lanes);
            let loaded = _mm256_maskload_ps(from, mask);
            Self(_mm256_blendv_ps(_mm256_set1_ps(fill), loaded, _mm256_castsi256_ps(mask)))
        }
    }
    #[inline(always)]
    unsafe fn reduce_add(self) -> f32 {
        let mut lanes = [0f32; 8];
        unsafe { self.store(lanes.as_mut_ptr()) };
        lanes.iter().sum()
    }
    #[inline(always)]
    unsafe fn reduce_max(self) -> f32 {
        let mut lanes = [0f32; 8];
        unsafe { self.store(lanes.as_mut_ptr()) };
        lanes.into_iter().fold(f32::NEG_INFINITY, f32::max)
    }
}

/// All ones (the sign bit that masked loads and stores read) in the lanes
/// below `lanes`.
///
/// # Safety
/// AVX2.
#[inline(always)]
unsafe fn avx2_first_lanes(lanes: usize) -> __m256i {
    unsafe { _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes.min(8) as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)) }
}

/// Independent chains of [`fma_steps`]: enough to cover an FMA's latency
/// (4 or 5 cycles) on two FMA units, within AVX2's 16 registers.
const FMA_CHAINS: usize = 10;

/// `steps` steps of [`FMA_CHAINS`] independent [`Vector::mul_add`]s, which
/// run at the CPU's FMA rate: to be timed. Returns the FMAs a step.
///
/// # Safety
/// The CPU has V's instruction set.
pub(crate) unsafe fn fma_steps<V: Vector>(steps: usize) -> usize {
    // SAFETY: the caller's contract.
    unsafe {
        V::enter(
            #[inline(always)]
            || {
                let (x, b) = std::hint::black_box((V::splat(1e-3), V::splat(0.999)));
                let mut acc = [V::zero(); FMA_CHAINS];
                for _ in 0..steps {
                    for acc in &mut acc {
                        *acc = x.mul_add(b, *acc);
                    }
                }
                std::hint::black_box(acc);
            },
        )
    };
    FMA_CHAINS
}

/// AVX512-BF16, which this CPU has and [`crate::set_limit`] allows (it
/// needs [`crate::Limit::Widest`]). Only [`bf16`] makes one, after
/// detection, so holding it is what lets the bfloat16 kernels run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Bf16Isa(());

/// AVX512-BF16 (with the AVX-512 F and BW it extends), if this CPU has it
/// and the limit allows it. Decided once per process.
pub(crate) fn bf16() -> Option<Bf16Isa> {
    static BF16: std::sync::OnceLock<Option<Bf16Isa>> = std::sync::OnceLock::new();
    *BF16.get_or_init(|| {
        let cpu = is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512bf16");
        (cpu && crate::limit() == crate::Limit::Widest).then_some(Bf16Isa(()))
    })
}

/// Sixteen lanes, each a pair of bfloat16s (the lower at the lower address)
/// in the bits of an f32, so that the f32 tile driver moves them as it moves
/// floats; only [`Vector::mul_add`] reads them as pairs, with `vdpbf16ps`,
/// summing in f32: a tile over k-pairs computes what the f32 tile computes
/// over k, at twice the products per instruction.
#[derive(Clone, Copy)]
pub(crate) struct Bf16Pairs(Avx512);

// SAFETY (all methods): the caller runs them on a CPU with AVX512-BF16 (a
// `Bf16Isa`), which has AVX-512F and BW. Moving pairs is moving floats.
impl Vector for Bf16Pairs {
    const LANES: usize = 16;
    /// As [`Avx512`]: 6 x 4 + 4 + 1 of the 32 registers.
    const TILE_PANELS: usize = 4;

    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn enter<T>(kernel: impl FnOnce() -> T) -> T {
        kernel()
    }
    #[inline(always)]
    unsafe fn zero() -> Self {
        unsafe { Self(Avx512::zero()) }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        unsafe { Self(Avx512::splat(x)) }
    }
    #[inline(always)]
    unsafe fn load(from: *const f32) -> Self {
        unsafe { Self(Avx512::load(from)) }
    }
    #[inline(always)]
    unsafe fn store(self, to: *mut f32) {
        unsafe { self.0.store(to) }
    }
    #[inline(always)]
    unsafe fn store_first(self, to: *mut f32, lanes: usize) {
        unsafe { self.0.store_first(to, lanes) }
    }
    #[inline(always)]
    unsafe fn mul_add(self, b: Self, acc: Self) -> Self {
        // SAFETY: bit casts between two 512-bit vector types.
        unsafe {
            let pairs = |v: Self| std::mem::transmute::<__m512, __m512bh>(v.0.0);
            Self(Avx512(_mm512_dpbf16_ps(acc.0.0, pairs(self), pairs(b))))
        }
    }
    /// The sums are f32s.
    #[inline(always)]
    unsafe fn gelu_of_sums(self) -> Self {
        unsafe { Self(gelu(self.0)) }
    }
}

impl Bf16Pairs {
    /// A product's f32 sums, as the float vector they are.
    #[inline(always)]
    pub(crate) fn sums(self) -> Avx512 {
        self.0
    }

    /// f32 sums as the accumulator of a product that goes on adding to them.
    #[inline(always)]
    pub(crate) fn accumulating(sums: Avx512) -> Self {
        Self(sums)
    }
}

/// `values` as bfloat16s, rounded to nearest even as `vcvtneps2bf16`
/// rounds, two to each f32 slot of `into` (see [`Bf16Pairs`]); a last odd
/// value is paired with zero.
///
/// # Safety
/// The CPU has AVX512-BF16 (a [`Bf16Isa`]); `into` holds
/// `values.len().div_ceil(2)` slots.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(crate) unsafe fn bf16_pairs(values: &[f32], into: &mut [std::mem::MaybeUninit<f32>]) {
    assert_eq!(into.len(), values.len().div_ceil(2));
    let full = values.len() - values.len() % 16;
    let out = into.as_mut_ptr().cast::<u16>();
    // SAFETY: reads below `full` are inside `values`; 16 values fill 8 slots,
    // inside `into`; the tail's masked loads and stores touch only its lanes,
    // and its odd last half slot is written as zero.
    unsafe {
        for i in (0..full).step_by(16) {
            let halves = _mm512_cvtneps_pbh(_mm512_loadu_ps(values.as_ptr().add(i)));
            _mm256_storeu_si256(out.add(i).cast(), std::mem::transmute::<__m256bh, __m256i>(halves));
        }
        let tail = values.len() - full;
        if tail > 0 {
            let mask: __mmask16 = (1 << tail) - 1;
            let halves = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, values.as_ptr().add(full)));
            // Up to 16 halves: the mask is made wider than its 16 bits.
            let mask = ((1u32 << tail.next_multiple_of(2)) - 1) as __mmask16;
            _mm256_mask_storeu_epi16(out.add(full).cast(), mask, std::mem::transmute::<__m256bh, __m256i>(halves));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `check` for each vector type this CPU has, with its 2^x and
    /// its softmax of a row in base 2.
    fn on_every_float_vector(check: impl Fn(&FloatVectorFns, &str)) {
        fn lanewise<V: FloatLanes>(x: &[f32], f: fn(V) -> V) -> Vec<f32> {
            x.chunks(V::LANES)
                .flat_map(|x| {
                    let mut lanes = vec![0f32; V::LANES];
                    // SAFETY: the caller checked the instruction set; the
                    // chunk's lanes are read, and all of `lanes` written.
                    unsafe { V::enter(|| f(V::load_first(x.as_ptr(), x.len(), 0.0)).store(lanes.as_mut_ptr())) };
                    lanes.truncate(x.len());
                    lanes
                })
                .collect()
        }
        fn exp2s<V: FloatLanes>(x: &[f32]) -> Vec<f32> {
            // SAFETY: `lanewise` runs it inside V's instruction set.
            lanewise::<V>(x, |v| unsafe { v.exp2() })
        }
        fn softmax<V: FloatLanes>(row: &mut [f32]) -> f32 {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            // SAFETY: the caller checked the instruction set.
            unsafe { V::enter(|| 1.0 / exp2_sum::<V>(row, 1.0, max)) }
        }
        for isa in usable() {
            match isa.width() {
                Width::Avx2 => check(&(exp2s::<Avx2>, softmax::<Avx2>), "AVX2"),
                Width::Avx512 => check(&(exp2s::<Avx512>, softmax::<Avx512>), "AVX-512"),
            }
        }
    }

    /// 2^x of values, and a row's softmax (returning 1 / its sum).
    type FloatVectorFns = (fn(&[f32]) -> Vec<f32>, fn(&mut [f32]) -> f32);

    #[test]
    fn exp2_is_close_to_exp2_of_x_or_the_floor() {
        // Every 0.01 down to past the floor, and below it.
        let xs = (0..7000).map(|i| -(i as f32) * 0.01);
        let xs: Vec<f32> = xs.chain([-126.0, -1000.0, f32::NEG_INFINITY]).collect();
        on_every_float_vector(|(exp2s, _), isa| {
            for (&x, fast) in xs.iter().zip(exp2s(&xs)) {
                let exact = f64::from(x.max(EXP2_FLOOR)).exp2();
                assert!((f64::from(fast) - exact).abs() <= 2e-7 * exact, "{isa}: {x}: {fast} vs {exact}");
                assert!(fast.is_normal(), "{isa}: {x}: {fast} is not a normal float");
            }
        });
    }

    #[test]
    fn numerators_from_the_row_max_over_their_sum_are_the_softmax() {
        // No full vector, a partial last one of every length, and rows past
        // the four-vector step.
        for len in (1..40).chain([64, 65, 127, 197, 1201]) {
            let scores: Vec<f32> = (0..len).map(|i| ((i * 7919) % 97) as f32 * 0.3 - 10.0).collect();
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f64 = scores.iter().map(|&s| f64::from(s - max).exp2()).sum();
            on_every_float_vector(|(.., softmax), isa| {
                let mut row = scores.clone();
                let inv_sum = softmax(&mut row);
                for (&numerator, &s) in row.iter().zip(&scores) {
                    let expected = f64::from(s - max).exp2() / sum;
                    let ours = f64::from(numerator * inv_sum);
                    assert!((ours - expected).abs() < 1e-6, "{isa}, {len}: {ours} vs {expected}");
                }
            });
        }
    }

    #[test]
    fn vector_gelu_is_the_plain_loops_gelu() {
        // Every 0.01 over [-15, 15), past where e^-x²/2 reaches its floor,
        // in rows of 3001 values (a partial last vector), with a bias.
        let xs: Vec<f32> = (0..3001).map(|i| i as f32 * 0.01 - 15.0).collect();
        let bias: Vec<f32> = (0..3001).map(|i| (i % 7) as f32 * 0.01 - 0.03).collect();
        for isa in usable() {
            let mut ours = [xs.clone(), xs.iter().map(|x| -x).collect()].concat();
            bias_gelu_erf(isa, &mut ours, &bias);
            for (i, &g) in ours.iter().enumerate() {
                let x = if i < xs.len() { xs[i] } else { -xs[i - xs.len()] } + bias[i % bias.len()];
                let expected = crate::rows::gelu(x, true);
                assert!((g - expected).abs() <= 1e-6 * x.abs().max(1.0), "{isa}: GELU({x}) = {g}, not {expected}");
            }
        }
    }

    #[test]
    fn avx2_store_first_writes_only_those_lanes() {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            return;
        }
        for lanes in 0..=8 {
            let mut out = [-1f32; 8];
            // SAFETY: AVX2 and FMA are present, checked above.
            unsafe { Avx2::enter(|| Avx2::splat(7.0).store_first(out.as_mut_ptr(), lanes)) };
            for (lane, &v) in out.iter().enumerate() {
                assert_eq!(v, if lane < lanes { 7.0 } else { -1.0 }, "{lanes} lanes, lane {lane}");
            }
        }
    }
}
