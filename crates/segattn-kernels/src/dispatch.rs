//! One table of kernels per instruction set, as the gemm crate dispatches:
//! the product of the linear layers, the attention of a block of queries,
//! and the layouts they read, chosen together once per process. Adding an
//! instruction set is one more table (and its `simd::Vector`); the drivers
//! (`matmul`, `attention`) only ever call through a table.
//!
//! A table whose kernels need an instruction set is only handed out for
//! that set's token ([`Isa`], [`Bf16Isa`]), made after detection, so
//! holding a `&Kernels` is what lets its kernels run.

use std::mem::MaybeUninit;

use crate::caches::Caches;
use crate::layout::{HeadMajor, Precision, QueryBlock};
use crate::matmul::Epilogue;
use crate::portable;
#[cfg(target_arch = "x86_64")]
use crate::simd::{self, Avx2, Avx512, Bf16Isa, Bf16Pairs, Isa, Vector, Width};
use crate::stages::Laps;
#[cfg(target_arch = "x86_64")]
use crate::{tile_attention, tile_matmul};

/// `out` (rows x outputs) = x (rows x inputs) · W, then the epilogue, W in
/// the table's panels, blocked so that runs of the last argument's rows of
/// x stay in cache.
type Product = unsafe fn(&[f32], usize, &[f32], usize, Epilogue, &mut [MaybeUninit<f32>], usize);
/// Kᵀ and V of each head, from qkv rows: (qkv, tokens, heads, head_dim).
type PackHeads = fn(&[f32], usize, usize, usize) -> HeadMajor;
/// One head of a block of query rows through the attention, each stage's
/// time lapped on the stopwatch; row 0's probabilities when the block asks
/// for them. Its walk through the keys is sized from the caches.
type AttendBlock = unsafe fn(QueryBlock, &Caches, &mut Laps) -> Vec<f32>;

/// The kernels of one instruction set.
pub(crate) struct Kernels {
    /// The product's name, which also names the layout of its panels.
    pub(crate) matmul_name: &'static str,
    pub(crate) attention_name: &'static str,
    pub(crate) precision: Precision,
    /// Columns per panel of W; `None`: one panel as wide as W.
    panel_lanes: Option<usize>,
    product: Product,
    /// The head size the attention kernels take; `None`: any.
    head_dim: Option<usize>,
    pack_heads: PackHeads,
    attend_block: AttendBlock,
    /// Steps of independent FMAs, the product's own, to time the CPU's
    /// peak; returns the FMAs a step. `None` for the gemm crate's, whose
    /// instructions are its own.
    fma_steps: Option<unsafe fn(usize) -> usize>,
}

static GEMM: Kernels = Kernels {
    matmul_name: "gemm crate",
    attention_name: "gemm crate around a softmax pass",
    precision: Precision::F32,
    panel_lanes: None,
    product: portable::product,
    head_dim: None,
    pack_heads: HeadMajor::row_major,
    attend_block: portable::attend_block,
    fma_steps: None,
};

/// The f32 register tiles of `V`'s instruction set.
#[cfg(target_arch = "x86_64")]
macro_rules! tiles {
    ($name:literal, $vector:ty) => {
        Kernels {
            matmul_name: $name,
            attention_name: $name,
            precision: Precision::F32,
            panel_lanes: Some(<$vector>::LANES),
            product: tile_matmul::product::<$vector, { <$vector>::TILE_PANELS }>,
            head_dim: Some(tile_attention::HEAD_DIM),
            pack_heads: HeadMajor::in_panels::<{ <$vector>::LANES }>,
            attend_block: tile_attention::attend_block::<$vector, { <$vector>::TILE_PANELS }>,
            fma_steps: Some(simd::fma_steps::<$vector>),
        }
    };
}

#[cfg(target_arch = "x86_64")]
static AVX2: Kernels = tiles!("register tiles, AVX2", Avx2);
#[cfg(target_arch = "x86_64")]
static AVX512: Kernels = tiles!("register tiles, AVX-512", Avx512);
#[cfg(target_arch = "x86_64")]
static BF16: Kernels = Kernels {
    matmul_name: "bfloat16 register tiles, AVX512-BF16",
    attention_name: "bfloat16 register tiles, AVX512-BF16",
    precision: Precision::Bf16,
    panel_lanes: Some(Bf16Pairs::LANES),
    product: tile_matmul::bf16_product,
    head_dim: Some(tile_attention::HEAD_DIM),
    pack_heads: HeadMajor::pairs::<{ Bf16Pairs::LANES }>,
    attend_block: tile_attention::attend_block::<tile_attention::Bf16Math, { Bf16Pairs::TILE_PANELS }>,
    fma_steps: Some(simd::fma_steps::<Bf16Pairs>),
};

impl Kernels {
    /// The gemm crate's, which every CPU runs.
    pub(crate) fn portable() -> &'static Self {
        &GEMM
    }

    /// The f32 tiles of `isa`.
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn tiles(isa: Isa) -> &'static Self {
        match isa.width() {
            Width::Avx2 => &AVX2,
            Width::Avx512 => &AVX512,
        }
    }

    /// The bfloat16 tiles.
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn bf16_tiles(_: Bf16Isa) -> &'static Self {
        &BF16
    }

    /// The fastest table here for products in `precision`; f32's where
    /// bfloat16 is not available ([`Bf16Support`]).
    pub(crate) fn best(precision: Precision) -> &'static Self {
        #[cfg(target_arch = "x86_64")]
        if let (Precision::Bf16, Bf16Support::Faster(isa)) = (precision, Self::bf16_support()) {
            return Self::bf16_tiles(isa);
        }
        #[cfg(target_arch = "x86_64")]
        if let Some(isa) = simd::widest() {
            return Self::tiles(isa);
        }
        Self::portable()
    }

    /// Whether bfloat16 tiles run here, and pay: decided once per process.
    /// A `vdpbf16ps` multiplies twice the values of an f32 FMA, but the
    /// CPUs that have it do not all issue it as often: Zen 4 as often as
    /// its FMAs, a Sapphire Rapids Xeon a quarter as often. Where it would
    /// not multiply clearly faster (by a quarter, to pay for converting x
    /// and the softmax's numerators to pairs), the f32 tiles are both
    /// faster and exact, so bfloat16 is not available there.
    pub(crate) fn bf16_support() -> Bf16Support {
        #[cfg(target_arch = "x86_64")]
        {
            static SUPPORT: std::sync::OnceLock<Bf16Support> = std::sync::OnceLock::new();
            *SUPPORT.get_or_init(|| match simd::bf16() {
                None => Bf16Support::NoInstructions,
                Some(isa) => {
                    // Short runs, alternated, so that both meet the same clock:
                    // a ratio far from one either way, well under a millisecond.
                    let rate = |table: &Self| table.fma_rate_of(20_000, 1);
                    let (bf16, f32) = (0..5)
                        .filter_map(|_| Some((rate(Self::bf16_tiles(isa))?, rate(&AVX512)?)))
                        .fold((0f64, 0f64), |(b, f), (bf16, f32)| (b.max(bf16), f.max(f32)));
                    if bf16 >= 1.25 * f32 { Bf16Support::Faster(isa) } else { Bf16Support::Slower }
                }
            })
        }
        #[cfg(not(target_arch = "x86_64"))]
        Bf16Support::NoInstructions
    }

    /// The fastest table here whose attention takes heads of `head_dim`.
    pub(crate) fn best_attention(head_dim: usize, precision: Precision) -> &'static Self {
        let best = Self::best(precision);
        if best.attends(head_dim) { best } else { Self::portable() }
    }

    /// Every table this CPU runs, for the tests.
    #[cfg(test)]
    pub(crate) fn all_here() -> Vec<&'static Self> {
        #[cfg(target_arch = "x86_64")]
        return std::iter::once(Self::portable())
            .chain(simd::usable().map(Self::tiles))
            .chain(simd::bf16().map(Self::bf16_tiles))
            .collect();
        #[cfg(not(target_arch = "x86_64"))]
        vec![Self::portable()]
    }

    /// Whether the attention kernels take heads of `head_dim`.
    pub(crate) fn attends(&self, head_dim: usize) -> bool {
        self.head_dim.is_none_or(|taken| taken == head_dim)
    }

    /// Columns per panel of a W of `outputs` rows.
    pub(crate) fn panel_width(&self, outputs: usize) -> usize {
        self.panel_lanes.unwrap_or(outputs).max(1)
    }

    /// Inputs per value of a panel: pairs, in bfloat16.
    pub(crate) fn inputs_per_slot(&self) -> usize {
        match self.precision {
            Precision::F32 => 1,
            Precision::Bf16 => 2,
        }
    }

    /// `out` = x · W, then `epilogue`, for `panels` laid out for this table
    /// ([`Kernels::panel_width`], [`Kernels::inputs_per_slot`]), blocked for
    /// `caches`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn product(
        &self,
        x: &[f32],
        inputs: usize,
        panels: &[f32],
        outputs: usize,
        epilogue: Epilogue,
        out: &mut [MaybeUninit<f32>],
        caches: &Caches,
    ) {
        let slots = outputs.div_ceil(self.panel_width(outputs)) * self.panel_width(outputs);
        assert!(
            x.len() == out.len() / outputs * inputs
                && panels.len() == slots * inputs.div_ceil(self.inputs_per_slot())
                && epilogue.bias().is_none_or(|bias| bias.len() == outputs),
            "{}: operands of another shape",
            self.matmul_name
        );
        // Half of L2 for x's rows (as the product reads them: pairs, in
        // bfloat16), the rest for W's panels and the output.
        let row_bytes = inputs.div_ceil(self.inputs_per_slot()) * size_of::<f32>();
        let x_rows_in_cache = (caches.l2 / 2 / row_bytes).max(1);
        // SAFETY: this table was handed out only for an instruction set the
        // CPU has (see the module's doc), and the shapes are checked above.
        unsafe { (self.product)(x, inputs, panels, outputs, epilogue, out, x_rows_in_cache) }
    }

    /// Kᵀ and V of each head of `qkv`, as [`Kernels::attend_block`] reads them.
    pub(crate) fn pack_heads(&self, qkv: &[f32], tokens: usize, heads: usize, head_dim: usize) -> HeadMajor {
        assert!(self.attends(head_dim), "{}: heads of {head_dim}", self.attention_name);
        HeadMajor { layout: self.attention_name, ..(self.pack_heads)(qkv, tokens, heads, head_dim) }
    }

    /// One head of a block of query rows; `block.heads` must come from this
    /// table's [`Kernels::pack_heads`].
    pub(crate) fn attend_block(&self, block: QueryBlock, caches: &Caches, laps: &mut Laps) -> Vec<f32> {
        assert_eq!(block.heads.layout, self.attention_name, "heads packed for another kernel");
        let (head, rows, heads) = (block.head, block.out.rows(), block.heads);
        assert!(head < heads.num_heads && block.first + rows <= heads.tokens, "rows {}.. of head {head}", block.first);
        // SAFETY: the instruction set as in `product`; the heads were packed
        // by this table (checked above), for a head size it takes, and the
        // block's rows and head are among theirs.
        unsafe { (self.attend_block)(block, caches, laps) }
    }
}

impl Kernels {
    /// Floating-point operations a second that one thread's FMAs reach
    /// here, in the instructions of this table's product (a multiply-add
    /// counts two per value multiplied); `None` for the gemm crate's.
    pub(crate) fn fma_rate(&self) -> Option<f64> {
        // The best of 20 runs of some 3 ms: the clock has ramped up by the
        // last, and on a busy machine some run without being preempted.
        self.fma_rate_of(1_000_000, 20)
    }

    /// [`Kernels::fma_rate`], the best of `runs` runs of `steps` steps.
    fn fma_rate_of(&self, steps: usize, runs: usize) -> Option<f64> {
        let (fma_steps, lanes) = (self.fma_steps?, self.multiplied_lanes()?);
        let (best, fmas_per_step) = (0..runs)
            .map(|_| {
                let start = std::time::Instant::now();
                // SAFETY: as in `product`.
                let fmas_per_step = unsafe { fma_steps(steps) };
                (start.elapsed(), fmas_per_step)
            })
            .min()?;
        Some((2 * lanes * fmas_per_step * steps) as f64 / best.as_secs_f64())
    }

    /// f32 values one vector FMA of the product multiplies.
    pub(crate) fn multiplied_lanes(&self) -> Option<usize> {
        Some(self.panel_lanes? * self.inputs_per_slot())
    }
}

impl std::fmt::Debug for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.matmul_name)
    }
}

/// Whether bfloat16 products run here, and why not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Bf16Support {
    /// No AVX512-BF16, or [`crate::set_limit`] leaves it out.
    NoInstructions,
    /// Its dot products multiply less than a quarter faster than f32's
    /// FMAs, or slower.
    Slower,
    #[cfg(target_arch = "x86_64")]
    Faster(Bf16Isa),
}

impl Precision {
    /// Whether this CPU (under [`crate::set_limit`]) runs it: whether the
    /// best kernels for it multiply in it.
    pub fn is_available(self) -> bool {
        Kernels::best(self).precision == self
    }

    /// Why this CPU runs f32 products instead, in words; `None` where it
    /// runs this precision.
    pub fn unavailable_because(self) -> Option<&'static str> {
        match self {
            Precision::F32 => None,
            Precision::Bf16 => match Kernels::bf16_support() {
                #[cfg(target_arch = "x86_64")]
                Bf16Support::Faster(_) => None,
                Bf16Support::NoInstructions => Some(
                    "AVX512-BF16 is missing (from the CPU, or from the instruction sets the kernels are limited to)",
                ),
                Bf16Support::Slower => Some(
                    "this CPU's bfloat16 dot products (vdpbf16ps) multiply too few values a second to beat its f32 FMAs",
                ),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The short measurement that decides bfloat16 agrees with the long one
    /// the peak is read from, and the two ways of asking agree with it.
    #[test]
    fn bfloat16_runs_where_it_measures_faster() {
        let support = Kernels::bf16_support();
        assert_eq!(Precision::Bf16.is_available(), Precision::Bf16.unavailable_because().is_none());
        assert_eq!(
            Precision::Bf16.is_available(),
            !matches!(support, Bf16Support::NoInstructions | Bf16Support::Slower)
        );
        assert!(Precision::F32.is_available() && Precision::F32.unavailable_because().is_none());
        #[cfg(target_arch = "x86_64")]
        if let Some(isa) = simd::bf16() {
            let (bf16, f32) = (Kernels::bf16_tiles(isa).fma_rate().unwrap(), AVX512.fma_rate().unwrap());
            println!("bfloat16 pairs multiply {:.2}x the values a second of f32 FMAs here", bf16 / f32);
            assert_eq!(matches!(support, Bf16Support::Faster(_)), bf16 >= 1.25 * f32, "{bf16} against {f32}");
        }
    }
}
