//! One head of a block of query rows through softmax(Q Kᵀ · scale) V with
//! register tiles, for heads of 64 dimensions (every DINO and DINOv2 size).
//!
//! The GEMM path re-packs all of a head's keys and values for every block,
//! and its scores (block rows x tokens) live in L2. Here Kᵀ and V are packed
//! once per layer, in the one-vector panels of the matmul tiles, and the
//! block walks them a step of keys at a time, as flash attention does
//! ([`Walk`]): each group of query rows computes its scores over the step,
//! turns them into numerators over its rows' largest score so far
//! ([`RunningSoftmax`]), and adds their P·V to its output, both products
//! on those tiles (six rows by P panels, as there).
//!
//! In bfloat16 ([`Bf16Math`]) the same tiles multiply pairs: Kᵀ and V packed
//! in pairs of dimensions and of tokens, each tile's queries and softmax
//! numerators converted as it reaches them; scores, softmax and sums stay f32.

use crate::buffers::LineAligned;
use crate::caches::Caches;
use crate::exp::fast_exp2;
use crate::layout::{HeadMajor, QueryBlock};
use crate::simd::{self, Avx512, Bf16Pairs, FloatLanes, Vector};
use crate::stages::{Laps, Stage};
use crate::tile_matmul::{TILE_ROWS, tile_product};

/// What a tile multiplies in: f32 vectors, or bfloat16 pairs summed in f32.
///
/// # Safety
/// As [`Vector`]: the methods need the operand's instruction set.
pub(crate) trait TileMath {
    /// The products' operands.
    type Operand: Vector;
    /// The products' sums, as floats.
    type Sum: FloatLanes;
    /// Values of a row per operand slot.
    const PER_SLOT: usize;
    /// `rows` rows of `len` values from `at`, `stride` apart, as the
    /// products read them: in place, or converted into `buffer`. Returns
    /// where they are and their stride.
    ///
    /// # Safety
    /// The rows are readable.
    unsafe fn operands(
        at: *const f32,
        stride: usize,
        rows: usize,
        len: usize,
        buffer: &mut Vec<f32>,
    ) -> (*const f32, usize);
    /// A product's sums.
    unsafe fn sums(acc: Self::Operand) -> Self::Sum;
    /// Sums as a product's accumulator, to go on adding to them.
    unsafe fn accumulator(sums: Self::Sum) -> Self::Operand;
}

// SAFETY (all methods): as the trait says.
impl<V: FloatLanes> TileMath for V {
    type Operand = V;
    type Sum = V;
    const PER_SLOT: usize = 1;
    #[inline(always)]
    unsafe fn operands(at: *const f32, stride: usize, _: usize, _: usize, _: &mut Vec<f32>) -> (*const f32, usize) {
        (at, stride)
    }
    #[inline(always)]
    unsafe fn sums(acc: V) -> V {
        acc
    }
    #[inline(always)]
    unsafe fn accumulator(sums: V) -> V {
        sums
    }
}

/// bfloat16 pairs on AVX512-BF16, summed in AVX-512 f32 vectors.
pub(crate) struct Bf16Math;

// SAFETY (all methods): run inside `Bf16Pairs::enter`, on a CPU with
// AVX512-BF16 (a `Bf16Isa`).
impl TileMath for Bf16Math {
    type Operand = Bf16Pairs;
    type Sum = Avx512;
    const PER_SLOT: usize = 2;
    #[inline(always)]
    unsafe fn operands(
        at: *const f32,
        stride: usize,
        rows: usize,
        len: usize,
        buffer: &mut Vec<f32>,
    ) -> (*const f32, usize) {
        let slots = len.div_ceil(2);
        buffer.clear();
        buffer.reserve(rows * slots);
        for (r, out) in buffer.spare_capacity_mut()[..rows * slots].chunks_exact_mut(slots).enumerate() {
            // SAFETY: the caller's contract for the row; the instruction set
            // as the impl says.
            unsafe { simd::bf16_pairs(std::slice::from_raw_parts(at.add(r * stride), len), out) };
        }
        // SAFETY: every row's slots were written.
        unsafe { buffer.set_len(rows * slots) };
        (buffer.as_ptr(), slots)
    }
    #[inline(always)]
    unsafe fn sums(acc: Bf16Pairs) -> Avx512 {
        acc.sums()
    }
    #[inline(always)]
    unsafe fn accumulator(sums: Avx512) -> Bf16Pairs {
        Bf16Pairs::accumulating(sums)
    }
}

/// Dimensions per head that the tiles are written for.
pub(crate) const HEAD_DIM: usize = 64;

/// Runs `$body` for each tile of up to [`TILE_ROWS`] of `$rows` rows, with
/// `$first` its first row and `$r` its number of rows, a constant.
macro_rules! each_tile {
    ($rows:expr, |$first:ident, $r:ident| $body:expr) => {
        for $first in (0..$rows).step_by(TILE_ROWS) {
            match $rows - $first {
                1 => {
                    const $r: usize = 1;
                    $body
                }
                2 => {
                    const $r: usize = 2;
                    $body
                }
                3 => {
                    const $r: usize = 3;
                    $body
                }
                4 => {
                    const $r: usize = 4;
                    $body
                }
                5 => {
                    const $r: usize = 5;
                    $body
                }
                _ => {
                    const $r: usize = TILE_ROWS;
                    $body
                }
            }
        }
    };
}

/// How a block is walked, sized from the caches: a step of keys (and their
/// values) at a time, each step read by every group of the block's query
/// rows, as flash attention walks them. A step's keys and values fill a
/// quarter of L2, so each comes from memory or L3 once per block rather
/// than once per group, and a group's scores over a step another quarter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Walk {
    /// Keys per step: a multiple of a step of P key panels.
    step_tokens: usize,
    /// Query rows whose scores over a step are computed, turned into
    /// numerators and mixed together.
    group_rows: usize,
}

impl Walk {
    fn new<M: TileMath, const P: usize>(caches: &Caches, tokens: usize, rows: usize) -> Self {
        let panels_step = P * M::Operand::LANES;
        let fitting = caches.l2 / 4 / (2 * HEAD_DIM * size_of::<f32>());
        let step_tokens = (fitting.min(tokens.next_multiple_of(panels_step)) / panels_step).max(1) * panels_step;
        let fitting = caches.l2 / 4 / (step_tokens * size_of::<f32>());
        let group_rows = (fitting.min(rows.next_multiple_of(TILE_ROWS)) / TILE_ROWS).max(1) * TILE_ROWS;
        Self { step_tokens, group_rows }
    }
}

/// A query row's softmax so far, over the steps of keys it has seen: the
/// largest score, and the sum of 2^(s - that largest), scores in base 2
/// (the products q·k times [`QueryBlock::scale`]), as [`simd::exp2_sum`]
/// takes them. When a step raises the largest, the sums so far (and the
/// row's P·V so far) are scaled by 2^(old - new).
#[derive(Clone, Copy, Debug)]
struct RunningSoftmax {
    max: f32,
    sum: f32,
    /// What the step just taken scaled the sums before it by.
    rescale: f32,
}

impl RunningSoftmax {
    const START: Self = Self { max: f32::NEG_INFINITY, sum: 0.0, rescale: 0.0 };

    /// Turns a step's products q·k, whose largest is `step_max`, into
    /// numerators 2^(s - max) over the largest score s = q·k · `scale` so
    /// far; `scale` is positive, so the largest product makes the largest
    /// score. (Its exponent, taken in one FMA, may come out half an ulp of
    /// the largest above 0, which 2^x takes as it takes 0.)
    ///
    /// # Safety
    /// V's instruction set.
    #[inline(always)]
    unsafe fn step<V: FloatLanes>(&mut self, products: &mut [f32], scale: f32, step_max: f32) {
        // SAFETY: the caller's contract.
        unsafe {
            let max = self.max.max(step_max * scale);
            // At the first step (from -∞) it scales sums of 0.
            self.rescale = fast_exp2(self.max - max);
            self.sum = self.sum * self.rescale + simd::exp2_sum::<V>(products, scale, max);
            self.max = max;
        }
    }
}

/// The block's head, a step of keys at a time and in each a group of query
/// rows at a time ([`Walk`]), in tiles of six.
///
/// # Safety
/// The CPU must have M's instruction set; `heads` packed from `qkv` in
/// M's panels (lanes wide, M::PER_SLOT rows per slot), with heads of
/// [`HEAD_DIM`] dimensions, `head` one of them, and
/// `first + out.rows() <= heads.tokens`.
pub(crate) unsafe fn attend_block<M: TileMath, const P: usize>(
    block: QueryBlock,
    caches: &Caches,
    laps: &mut Laps,
) -> Vec<f32> {
    // SAFETY: the caller's contract.
    unsafe {
        M::Operand::enter(
            #[inline(always)]
            || attend_steps::<M, P>(block, caches, laps),
        )
    }
}

/// [`attend_block`]'s work, inlined into its instruction-set context.
///
/// # Safety
/// As [`attend_block`]: it reads and writes through pointers into `block`
/// that only that contract keeps in bounds.
#[inline(always)]
unsafe fn attend_steps<M: TileMath, const P: usize>(block: QueryBlock, caches: &Caches, laps: &mut Laps) -> Vec<f32> {
    let QueryBlock { qkv, heads, head, mut out, first, scale, keep_first_row } = block;
    let HeadMajor { tokens, num_heads, .. } = *heads;
    let (lanes, depth) = (M::Operand::LANES, HEAD_DIM / M::PER_SLOT);
    let d = num_heads * HEAD_DIM;
    let rows = out.rows();
    let (out, out_stride) = out.as_mut_ptr();
    let padded = tokens.next_multiple_of(lanes);
    let slots = tokens.div_ceil(M::PER_SLOT);
    let Walk { step_tokens, group_rows } = Walk::new::<M, P>(caches, tokens, rows);
    let mut scores = LineAligned::zeroed(group_rows * step_tokens);
    // Each group row's largest score over the step so far, lane by lane.
    let mut maxima = LineAligned::zeroed(group_rows * lanes);
    let mut softmax = vec![RunningSoftmax::START; rows];
    let mut buffers = Buffers::default();
    let mut first_row = Vec::with_capacity(if keep_first_row { tokens } else { 0 });
    // Row 0's largest score as each step's numerators were taken.
    let mut first_row_maxima = Vec::new();
    let keys = heads.keys_t[head * padded * depth..].as_ptr();
    let values = heads.values[head * slots * HEAD_DIM..].as_ptr();
    for step_start in (0..tokens).step_by(step_tokens) {
        let step_len = step_tokens.min(tokens - step_start);
        for start in (0..rows).step_by(group_rows) {
            let group = Group {
                rows: group_rows.min(rows - start),
                q: qkv[(first + start) * 3 * d + head * HEAD_DIM..].as_ptr(),
                q_stride: 3 * d,
                // SAFETY: the step's panels are inside the head's keys.
                keys: unsafe { keys.add(step_start * depth) },
                panels: step_len.div_ceil(lanes),
                values,
                slots,
                step: (step_start, step_len),
                out: out.wrapping_add(start * out_stride),
                out_stride,
            };
            // SAFETY: the group's rows are block rows, inside `qkv` and
            // `out` by the caller's contract; the step's keys and values
            // are inside the head's, as packed; `scores` holds the
            // group's rows of the step's padded tokens.
            unsafe { group.scores::<M, P>((&mut scores, step_tokens), &mut maxima, &mut buffers) };
            laps.lap(Stage::Scores);
            let rows_softmax = &mut softmax[start..start + group.rows];
            let rows = scores.chunks_mut(step_tokens).zip(maxima.chunks(lanes)).zip(rows_softmax.iter_mut());
            for ((row, maxima), softmax) in rows {
                // SAFETY: M's instruction set, by the caller's contract;
                // a row's maxima are a vector.
                unsafe {
                    softmax.step::<M::Sum>(&mut row[..step_len], scale, M::Sum::load(maxima.as_ptr()).reduce_max())
                };
            }
            if keep_first_row && start == 0 {
                first_row.extend_from_slice(&scores[..step_len]);
                first_row_maxima.push(rows_softmax[0].max);
            }
            laps.lap(Stage::Softmax);
            // SAFETY: as for the scores.
            unsafe { group.mix::<M, P>((&scores, step_tokens), rows_softmax, &mut buffers) };
            laps.lap(Stage::Mix);
        }
    }
    if keep_first_row {
        // Each step's numerators over the row's final largest score and sum.
        let RunningSoftmax { max, sum, .. } = softmax[0];
        for (numerators, step_max) in first_row.chunks_mut(step_tokens).zip(first_row_maxima) {
            let factor = fast_exp2(step_max - max) / sum;
            numerators.iter_mut().for_each(|p| *p *= factor);
        }
    }
    first_row
}

/// Where a group's queries and softmax numerators are converted to, when
/// its products read them converted.
#[derive(Default)]
struct Buffers {
    queries: Vec<f32>,
    numerators: Vec<f32>,
}

/// Query rows of one head whose scores over one step of keys are computed
/// together.
struct Group {
    rows: usize,
    q: *const f32,
    q_stride: usize,
    /// The step's first key panel.
    keys: *const f32,
    /// Key panels in the step.
    panels: usize,
    /// The head's values, `slots` rows of them.
    values: *const f32,
    slots: usize,
    /// The step's keys: (first, count).
    step: (usize, usize),
    out: *mut f32,
    out_stride: usize,
}

impl Group {
    /// scores[r][t] = q[r] · k[t], unscaled ([`RunningSoftmax::step`]
    /// scales them), for the group's rows and the
    /// step's keys, rows `stride` apart, a tile of rows at a time over the
    /// step's key panels, P at a time (then one): a tile's queries stay in
    /// L1 while the keys stream from L2, as the values do in [`Group::mix`],
    /// and each row's scores are stored in order. In `maxima`, a vector a
    /// row, each row's largest score over the step, lane by lane. Taken as
    /// the tiles store the scores, the maxima need no pass over them.
    ///
    /// # Safety
    /// M's instruction set; the group's rows of `q`, the step's key panels,
    /// `scores` for the group's rows of `stride`, which covers the step's
    /// panels, and `maxima` for the group's rows.
    #[inline(always)]
    unsafe fn scores<M: TileMath, const P: usize>(
        &self,
        (scores, stride): (&mut [f32], usize),
        maxima: &mut [f32],
        buffers: &mut Buffers,
    ) {
        // SAFETY: the caller's contract.
        unsafe {
            maxima[..self.rows * M::Sum::LANES].fill(f32::NEG_INFINITY);
            let queries = M::operands(self.q, self.q_stride, self.rows, HEAD_DIM, &mut buffers.queries);
            each_tile!(self.rows, |first, R| {
                let scores = (scores[first * stride..].as_mut_ptr(), stride);
                let maxima = maxima[first * M::Sum::LANES..].as_mut_ptr();
                let mut panel = 0;
                while panel + P <= self.panels {
                    self.tile_scores::<M, R, P>(queries, first, panel, scores, maxima);
                    panel += P;
                }
                while panel < self.panels {
                    self.tile_scores::<M, R, 1>(queries, first, panel, scores, maxima);
                    panel += 1;
                }
            });
        }
    }

    /// scores[r][keys of panels panel..panel+Q] for R query rows from
    /// `first`, of `queries` (where, and how far apart) as M's products
    /// read them, and their largest into the rows' `maxima`.
    ///
    /// # Safety
    /// M's instruction set; R rows of queries from `first` readable; panels
    /// `panel..panel + Q` of the step's keys readable; `scores` writable
    /// for R rows of its stride, which covers those panels; R vectors of
    /// `maxima` readable and writable.
    #[inline(always)]
    unsafe fn tile_scores<M: TileMath, const R: usize, const Q: usize>(
        &self,
        (queries, stride): (*const f32, usize),
        first: usize,
        panel: usize,
        (scores, scores_stride): (*mut f32, usize),
        maxima: *mut f32,
    ) {
        let (lanes, depth) = (M::Operand::LANES, HEAD_DIM / M::PER_SLOT);
        // SAFETY: (all pointer reads and writes) the caller's contract.
        unsafe {
            let keys = self.keys.add(panel * depth * lanes);
            let zero = [[M::Operand::zero(); Q]; R];
            let acc =
                tile_product::<M::Operand, R, Q>(zero, (queries.add(first * stride), stride), (keys, depth), depth);
            for (r, acc) in acc.iter().enumerate() {
                let mut max = M::Sum::load(maxima.add(r * lanes));
                for (p, &acc) in acc.iter().enumerate() {
                    let at = scores.add(r * scores_stride + (panel + p) * lanes);
                    let scores = M::sums(acc);
                    scores.store(at);
                    // Past the last key, a panel's lanes hold the zero keys'
                    // scores: read back with -∞ there.
                    let keys = self.step.1 - (panel + p) * lanes;
                    max = max.max(if keys >= lanes { scores } else { M::Sum::load_first(at, keys, f32::NEG_INFINITY) });
                }
                max.store(maxima.add(r * lanes));
            }
        }
    }

    /// out[r] = out[r] · rescale + Σ_t numerators[r][t] · v[t] over the
    /// step's values, for the group's rows (numerators `stride` apart),
    /// each step of P value panels read by all of the group's tiles. The
    /// first step of keys starts the sums, the last divides them by the
    /// rows' softmax sums.
    ///
    /// # Safety
    /// M's instruction set; the group's rows of `scores` over the step; the
    /// value panels; the group's rows of `out`, written by the steps before
    /// this one.
    #[inline(always)]
    unsafe fn mix<M: TileMath, const P: usize>(
        &self,
        (scores, stride): (&[f32], usize),
        softmax: &[RunningSoftmax],
        buffers: &mut Buffers,
    ) {
        // SAFETY: the caller's contract; HEAD_DIM is a multiple of P panels
        // on every instruction set.
        unsafe {
            let numerators = M::operands(scores.as_ptr(), stride, self.rows, self.step.1, &mut buffers.numerators);
            for panel in (0..HEAD_DIM / M::Operand::LANES).step_by(P) {
                each_tile!(self.rows, |first, R| {
                    self.tile_mix::<M, R, P>(numerators, first, panel, &softmax[first..first + R])
                });
            }
        }
    }

    /// out[R rows from `first`][dimensions of panels panel..panel+P], as
    /// [`Group::mix`] says.
    ///
    /// # Safety
    /// M's instruction set; R rows of numerators readable over the step;
    /// panels `panel..panel + P` of the values readable over it; R rows of
    /// `out` from `first` writable over those panels, and written by the
    /// steps before this one.
    #[inline(always)]
    unsafe fn tile_mix<M: TileMath, const R: usize, const P: usize>(
        &self,
        (numerators, stride): (*const f32, usize),
        first: usize,
        panel: usize,
        softmax: &[RunningSoftmax],
    ) {
        let lanes = M::Operand::LANES;
        // The step's rows of the values: tokens, or pairs of them.
        let (start, len) = (self.step.0 / M::PER_SLOT, self.step.1.div_ceil(M::PER_SLOT));
        // SAFETY: (all pointer reads and writes) the caller's contract.
        unsafe {
            let out = self.out.add(first * self.out_stride + panel * lanes);
            let mut acc = [[M::Operand::zero(); P]; R];
            if start > 0 {
                for (r, (acc, softmax)) in acc.iter_mut().zip(softmax).enumerate() {
                    for (p, acc) in acc.iter_mut().enumerate() {
                        let so_far = M::Sum::load(out.add(r * self.out_stride + p * lanes));
                        *acc = M::accumulator(so_far.mul(M::Sum::splat(softmax.rescale)));
                    }
                }
            }
            let values = self.values.add((panel * self.slots + start) * lanes);
            let acc = tile_product::<M::Operand, R, P>(
                acc,
                (numerators.add(first * stride), stride),
                (values, self.slots),
                len,
            );
            let last = start + len == self.slots;
            for (r, (acc, softmax)) in acc.iter().zip(softmax).enumerate() {
                for (p, &acc) in acc.iter().enumerate() {
                    let sums = M::sums(acc);
                    let sums = if last { sums.mul(M::Sum::splat(1.0 / softmax.sum)) } else { sums };
                    sums.store(out.add(r * self.out_stride + p * lanes));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simd::Avx2;

    #[test]
    fn the_tests_small_caches_split_keys_into_steps_and_blocks_into_groups() {
        // 97 keys, 37 query rows; steps of at least one step of AVX2's two panels.
        let [_, medium, small] = crate::caches::for_tests();
        assert_eq!(Walk::new::<Avx2, 2>(&medium, 97, 37), Walk { step_tokens: 16, group_rows: 42 });
        assert_eq!(Walk::new::<Avx2, 2>(&small, 97, 37), Walk { step_tokens: 16, group_rows: 12 });
        // Keys and a block smaller than what fits are one step and one group.
        assert_eq!(Walk::new::<Avx2, 2>(&small, 5, 5), Walk { step_tokens: 16, group_rows: 6 });
        let caches = crate::caches::caches();
        assert_eq!(Walk::new::<Avx2, 2>(&caches, 37, 5), Walk { step_tokens: 48, group_rows: 6 });
    }

    #[test]
    fn a_step_and_a_groups_scores_over_it_fit_half_of_l2() {
        let caches = crate::caches::caches();
        for rows in [6, 256] {
            let Walk { step_tokens, group_rows } = Walk::new::<Avx2, 2>(&caches, 100_000, rows);
            let bytes = (2 * HEAD_DIM + group_rows) * step_tokens * size_of::<f32>();
            assert!(bytes <= caches.l2 / 2, "{caches:?}, {rows} rows: {step_tokens} keys, {group_rows} rows");
            assert!(step_tokens.is_multiple_of(16) && group_rows.is_multiple_of(TILE_ROWS));
        }
    }
}
