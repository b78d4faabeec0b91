//! The vector operations the register-tile kernels are written in, once for
//! AVX-512 and once for AVX2 + FMA (most laptop CPUs), so that one generic
//! kernel serves both.

use std::arch::x86_64::*;

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
}

/// A vector whose lanes are f32s, for the steps that read them as numbers:
/// all but [`Bf16Pairs`].
///
/// # Safety
/// As [`Vector`].
pub(crate) trait FloatLanes: Vector {
    unsafe fn mul(self, b: Self) -> Self;
    /// Softmax of `row` short of its last step: leaves e^(s - max) in the
    /// row and returns 1/Σ.
    unsafe fn softmax_numerators(row: &mut [f32]) -> f32;
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
}

// SAFETY (all methods): as above.
impl FloatLanes for Avx512 {
    #[inline(always)]
    unsafe fn mul(self, b: Self) -> Self {
        unsafe { Self(_mm512_mul_ps(self.0, b.0)) }
    }
    #[inline(always)]
    unsafe fn softmax_numerators(row: &mut [f32]) -> f32 {
        unsafe { avx512_softmax_numerators(row) }
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
        unsafe {
            let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            // Lanes below `lanes` get all ones, the sign bit maskstore reads.
            let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes as i32), lane);
            _mm256_maskstore_ps(to, mask, self.0)
        }
    }
    #[inline(always)]
    unsafe fn mul_add(self, b: Self, acc: Self) -> Self {
        unsafe { Self(_mm256_fmadd_ps(self.0, b.0, acc.0)) }
    }
}

// SAFETY (all methods): as above.
impl FloatLanes for Avx2 {
    #[inline(always)]
    unsafe fn mul(self, b: Self) -> Self {
        unsafe { Self(_mm256_mul_ps(self.0, b.0)) }
    }
    /// The portable softmax, which the compiler vectorizes for AVX2 here.
    #[inline(always)]
    unsafe fn softmax_numerators(row: &mut [f32]) -> f32 {
        let mut inv_sum = [0f32];
        crate::exp::softmax_numerators_portable(row, row.len(), &mut inv_sum);
        inv_sum[0]
    }
}

/// Independent chains of [`fma_steps`]: enough to cover an FMA's latency
/// (4 or 5 cycles) on two FMA units, within AVX2's 16 registers.
pub(crate) const FMA_CHAINS: usize = 10;

/// `steps` steps of [`FMA_CHAINS`] independent [`Vector::mul_add`]s, which
/// run at the CPU's FMA rate: to be timed.
///
/// # Safety
/// The CPU has V's instruction set.
pub(crate) unsafe fn fma_steps<V: Vector>(steps: usize) {
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
    }
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
}

impl Bf16Pairs {
    /// A product's f32 sums, as the float vector they are.
    #[inline(always)]
    pub(crate) fn sums(self) -> Avx512 {
        self.0
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

/// AVX-512 softmax numerators, as `crate::exp::softmax_numerators_portable` computes them.
/// The exponential is FMAs and `vscalefps`, 11 instructions a vector against
/// 22 for the portable one, which has no FMA to rely on; four vectors a step
/// keep four sums apart.
#[target_feature(enable = "avx512f")]
fn avx512_softmax_numerators(row: &mut [f32]) -> f32 {
    const STEP: usize = 4 * 16;
    let len = row.len();
    let full = len - len % 16;
    let tail: __mmask16 = (1 << (len % 16)) - 1;
    let at = row.as_mut_ptr();
    // SAFETY: every full-vector access is below `full`; the tail's masked
    // loads and stores touch only its len % 16 lanes.
    unsafe {
        let mut max = [_mm512_set1_ps(f32::NEG_INFINITY); 4];
        let mut i = 0;
        while i + STEP <= full {
            for (j, max) in max.iter_mut().enumerate() {
                *max = _mm512_max_ps(*max, _mm512_loadu_ps(at.add(i + 16 * j)));
            }
            i += STEP;
        }
        for i in (i..full).step_by(16) {
            max[0] = _mm512_max_ps(max[0], _mm512_loadu_ps(at.add(i)));
        }
        max[1] = _mm512_mask_max_ps(max[1], tail, max[1], _mm512_maskz_loadu_ps(tail, at.add(full)));
        let max = _mm512_max_ps(_mm512_max_ps(max[0], max[1]), _mm512_max_ps(max[2], max[3]));
        let max = _mm512_set1_ps(_mm512_reduce_max_ps(max));

        let mut sum = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        while i + STEP <= full {
            for (j, sum) in sum.iter_mut().enumerate() {
                let e = avx512_exp(_mm512_sub_ps(_mm512_loadu_ps(at.add(i + 16 * j)), max));
                _mm512_storeu_ps(at.add(i + 16 * j), e);
                *sum = _mm512_add_ps(*sum, e);
            }
            i += STEP;
        }
        for i in (i..full).step_by(16) {
            let e = avx512_exp(_mm512_sub_ps(_mm512_loadu_ps(at.add(i)), max));
            _mm512_storeu_ps(at.add(i), e);
            sum[0] = _mm512_add_ps(sum[0], e);
        }
        let e = avx512_exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, at.add(full)), max));
        _mm512_mask_storeu_ps(at.add(full), tail, e);
        sum[1] = _mm512_mask_add_ps(sum[1], tail, sum[1], e);
        let sum = _mm512_add_ps(_mm512_add_ps(sum[0], sum[1]), _mm512_add_ps(sum[2], sum[3]));
        1.0 / _mm512_reduce_add_ps(sum)
    }
}

/// e^x per lane, to ~2 ulp for x in [-87, 0]: x = n·ln 2 + f with |f| <=
/// ln 2 / 2 (ln 2 in two parts, so f keeps its precision), e^f by its Taylor
/// series to degree 6 (error < 2e-7 there), then 2^n applied by `vscalefps`,
/// which also flushes far-negative x to 0.
#[inline]
#[target_feature(enable = "avx512f")]
fn avx512_exp(x: __m512) -> __m512 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
        x,
        _mm512_set1_ps(std::f32::consts::LOG2_E),
    ));
    let f = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
    let f = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), f);
    let mut p = _mm512_set1_ps(1.0 / 720.0);
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
    }
    _mm512_scalef_ps(p, n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn avx512_exp_is_close_to_exp() {
        // Without AVX-512 nothing calls this exp.
        if !is_x86_feature_detected!("avx512f") {
            return;
        }
        let xs: Vec<f32> = (0..1760).map(|i| -(i as f32) * 0.05).chain([-100.0, -1000.0]).collect();
        for x in xs.chunks(16) {
            let mut lanes = [0f32; 16];
            lanes[..x.len()].copy_from_slice(x);
            let mut fast = [0f32; 16];
            // SAFETY: AVX-512F is present, checked above.
            unsafe { _mm512_storeu_ps(fast.as_mut_ptr(), avx512_exp(_mm512_loadu_ps(lanes.as_ptr()))) };
            for (&x, &fast) in x.iter().zip(&fast) {
                let exact = (x as f64).exp() as f32;
                assert!((fast - exact).abs() <= 3e-7 * exact + f32::MIN_POSITIVE, "{x}: {fast} vs {exact}");
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
