//! One block of query rows through softmax(Q Kᵀ · scale) V with register
//! tiles, for heads of 64 dimensions (every DINO and DINOv2 size).
//!
//! The GEMM path re-packs all of a head's keys and values for every block,
//! and its scores (block rows x tokens) live in L2. Here Kᵀ and V are packed
//! once per layer, in the one-vector panels of the matmul tiles, and six
//! query rows go through scores, softmax and P·V, both products on those
//! tiles (P panels at a time, as there), while their scores (six rows x
//! tokens, 29 KB at 1201 tokens) stay in L1.
//!
//! In bfloat16 ([`Bf16Math`]) the same tiles multiply pairs: Kᵀ and V packed
//! in pairs of dimensions and of tokens, each tile's queries and softmax
//! numerators converted as it reaches them; scores, softmax and sums stay f32.

use crate::buffers::LineAligned;
use crate::caches::Caches;
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

/// How a block is walked, sized from the caches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Walk {
    /// Query rows whose scores are computed together: each step of key
    /// panels is read from L1 by all of the group's tiles, and the group's
    /// scores stay in half of L2.
    group_rows: usize,
    /// Rows of V's panels (tokens, or pairs of them) per chunk of P·V: a
    /// chunk of a step of P panels fits a quarter of L2, for every tile of
    /// the group to read it there. Smaller chunks, for L1, cost more in
    /// sums stored and loaded between chunks than they save.
    value_slots: usize,
}

impl Walk {
    fn new<M: TileMath, const P: usize>(caches: &Caches, padded: usize, rows: usize) -> Self {
        let fitting = caches.l2 / 2 / (padded * size_of::<f32>());
        let group_rows = (fitting.min(rows.next_multiple_of(TILE_ROWS)) / TILE_ROWS).max(1) * TILE_ROWS;
        let value_slots = (caches.l2 / 4 / (P * M::Operand::LANES * size_of::<f32>())).max(1);
        Self { group_rows, value_slots }
    }
}

/// The block, a group of query rows at a time ([`Walk`]), in tiles of six.
///
/// # Safety
/// The CPU must have M's instruction set; `heads` packed from `qkv` in
/// M's panels (lanes wide, M::PER_SLOT rows per slot), with heads of
/// [`HEAD_DIM`] dimensions, and `first + out.len() / hidden <= heads.tokens`.
pub(crate) unsafe fn attend_block<M: TileMath, const P: usize>(
    block: QueryBlock,
    caches: &Caches,
    laps: &mut Laps,
) -> Vec<f32> {
    // SAFETY: the caller's contract.
    unsafe {
        M::Operand::enter(
            #[inline(always)]
            || attend_groups::<M, P>(block, caches, laps),
        )
    }
}

/// [`attend_block`]'s work, inlined into its instruction-set context.
///
/// # Safety
/// As [`attend_block`]: it reads and writes through pointers into `block`
/// that only that contract keeps in bounds.
#[inline(always)]
unsafe fn attend_groups<M: TileMath, const P: usize>(block: QueryBlock, caches: &Caches, laps: &mut Laps) -> Vec<f32> {
    let QueryBlock { qkv, heads, out, first, scale, keep_first_row } = block;
    let HeadMajor { tokens, num_heads, .. } = *heads;
    let d = num_heads * HEAD_DIM;
    let rows = out.len() / d;
    let panels = tokens.div_ceil(M::Operand::LANES);
    let padded = panels * M::Operand::LANES;
    let Walk { group_rows, value_slots } = Walk::new::<M, P>(caches, padded, rows);
    let mut scores = LineAligned::zeroed(group_rows * padded);
    let mut inv_sums = vec![0f32; group_rows];
    let mut buffers = Buffers::default();
    let mut first_row = Vec::with_capacity(if keep_first_row { num_heads * tokens } else { 0 });
    for head in 0..num_heads {
        let keys = heads.keys_t[head * padded * HEAD_DIM / M::PER_SLOT..].as_ptr();
        let values = heads.values[head * tokens.div_ceil(M::PER_SLOT) * HEAD_DIM..].as_ptr();
        for start in (0..rows).step_by(group_rows) {
            let group = Group {
                rows: group_rows.min(rows - start),
                q: qkv[(first + start) * 3 * d + head * HEAD_DIM..].as_ptr(),
                q_stride: 3 * d,
                keys,
                panels,
                values,
                value_slots,
                tokens,
                out: out[start * d + head * HEAD_DIM..].as_mut_ptr().cast::<f32>(),
                out_stride: d,
                scale,
            };
            // SAFETY: the group's rows are block rows, inside `qkv` and `out`
            // by the caller's contract; keys hold `panels` panels per head
            // and values `tokens` rows, as packed; `scores` holds the
            // group's rows of `padded`.
            unsafe { group.scores::<M, P>(&mut scores, &mut buffers) };
            laps.lap(Stage::Scores);
            for (row, inv_sum) in scores.chunks_mut(padded).zip(&mut inv_sums).take(group.rows) {
                // SAFETY: M's instruction set, by the caller's contract.
                *inv_sum = unsafe { simd::softmax_numerators::<M::Sum>(&mut row[..tokens]) };
            }
            if keep_first_row && start == 0 {
                first_row.extend(scores[..tokens].iter().map(|p| p * inv_sums[0]));
            }
            laps.lap(Stage::Softmax);
            // SAFETY: as for the scores.
            unsafe { group.mix::<M, P>(&scores, &inv_sums, &mut buffers) };
            laps.lap(Stage::Mix);
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

/// Query rows of one head whose scores are computed together.
struct Group {
    rows: usize,
    q: *const f32,
    q_stride: usize,
    keys: *const f32,
    panels: usize,
    values: *const f32,
    value_slots: usize,
    tokens: usize,
    out: *mut f32,
    out_stride: usize,
    scale: f32,
}

impl Group {
    /// scores[r][t] = scale · q[r] · k[t] for the group's rows, P key panels
    /// at a time (then one), each read by all of the group's tiles.
    ///
    /// # Safety
    /// M's instruction set; the group's rows of `q`, the key panels, and
    /// `scores` for the group's rows of the padded tokens.
    #[inline(always)]
    unsafe fn scores<M: TileMath, const P: usize>(&self, scores: &mut [f32], buffers: &mut Buffers) {
        let padded = self.panels * M::Operand::LANES;
        // SAFETY: the caller's contract.
        unsafe {
            let queries = M::operands(self.q, self.q_stride, self.rows, HEAD_DIM, &mut buffers.queries);
            let mut panel = 0;
            while panel < self.panels {
                let step = if panel + P <= self.panels { P } else { 1 };
                each_tile!(self.rows, |first, R| {
                    let scores = scores[first * padded..].as_mut_ptr();
                    if step == P {
                        self.tile_scores::<M, R, P>(queries, first, panel, scores, padded)
                    } else {
                        self.tile_scores::<M, R, 1>(queries, first, panel, scores, padded)
                    }
                });
                panel += step;
            }
        }
    }

    /// scores[r][keys of panels panel..panel+Q] for R query rows from
    /// `first`, of `queries` (where, and how far apart) as M's products
    /// read them.
    ///
    /// # Safety
    /// M's instruction set; R rows of queries from `first` readable; panels
    /// `panel..panel + Q` of the keys readable; `scores` writable for R rows
    /// of `padded`, which covers those panels.
    #[inline(always)]
    unsafe fn tile_scores<M: TileMath, const R: usize, const Q: usize>(
        &self,
        (queries, stride): (*const f32, usize),
        first: usize,
        panel: usize,
        scores: *mut f32,
        padded: usize,
    ) {
        let (lanes, depth) = (M::Operand::LANES, HEAD_DIM / M::PER_SLOT);
        // SAFETY: (all pointer reads and writes) the caller's contract.
        unsafe {
            let keys = self.keys.add(panel * depth * lanes);
            let zero = [[M::Operand::zero(); Q]; R];
            let acc =
                tile_product::<M::Operand, R, Q>(zero, (queries.add(first * stride), stride), (keys, depth), depth);
            let scale = M::Sum::splat(self.scale);
            for (r, acc) in acc.iter().enumerate() {
                for (p, &acc) in acc.iter().enumerate() {
                    M::sums(acc).mul(scale).store(scores.add(r * padded + (panel + p) * lanes));
                }
            }
        }
    }

    /// out[r] = Σ_t numerators[r][t] · v[t] / Σ_r for the group's rows, in
    /// chunks of V's rows ([`Walk::value_slots`]), each step of P panels of
    /// a chunk read by all of the group's tiles. The sums so far wait in
    /// `out` between chunks.
    ///
    /// # Safety
    /// M's instruction set; the group's rows of `scores` (of the padded
    /// tokens) and of `out`; the value panels.
    #[inline(always)]
    unsafe fn mix<M: TileMath, const P: usize>(&self, scores: &[f32], inv_sums: &[f32], buffers: &mut Buffers) {
        let padded = self.panels * M::Operand::LANES;
        let slots = self.tokens.div_ceil(M::PER_SLOT);
        // SAFETY: the caller's contract; HEAD_DIM is a multiple of P panels
        // on every instruction set.
        unsafe {
            let numerators = M::operands(scores.as_ptr(), padded, self.rows, self.tokens, &mut buffers.numerators);
            for chunk in (0..slots).step_by(self.value_slots) {
                let chunk = (chunk, self.value_slots.min(slots - chunk));
                for panel in (0..HEAD_DIM / M::Operand::LANES).step_by(P) {
                    each_tile!(self.rows, |first, R| {
                        self.tile_mix::<M, R, P>(numerators, first, panel, chunk, &inv_sums[first..first + R])
                    });
                }
            }
        }
    }

    /// out[R rows from `first`][dimensions of panels panel..panel+P] +=
    /// numerators · v over the chunk (`start`, `len`) of V's rows; the last
    /// chunk divides by the rows' sums.
    ///
    /// # Safety
    /// M's instruction set; R rows of numerators readable over the chunk;
    /// panels `panel..panel + P` of the values readable over it; R rows of
    /// `out` from `first` writable over those panels, and written by the
    /// chunks before this one.
    #[inline(always)]
    unsafe fn tile_mix<M: TileMath, const R: usize, const P: usize>(
        &self,
        (numerators, stride): (*const f32, usize),
        first: usize,
        panel: usize,
        (start, len): (usize, usize),
        inv_sums: &[f32],
    ) {
        let lanes = M::Operand::LANES;
        let slots = self.tokens.div_ceil(M::PER_SLOT);
        // SAFETY: (all pointer reads and writes) the caller's contract.
        unsafe {
            let out = self.out.add(first * self.out_stride + panel * lanes);
            let mut acc = [[M::Operand::zero(); P]; R];
            if start > 0 {
                for (r, acc) in acc.iter_mut().enumerate() {
                    for (p, acc) in acc.iter_mut().enumerate() {
                        *acc = M::Operand::load(out.add(r * self.out_stride + p * lanes));
                    }
                }
            }
            let values = self.values.add((panel * slots + start) * lanes);
            let numerators = numerators.add(first * stride + start);
            let acc = tile_product::<M::Operand, R, P>(acc, (numerators, stride), (values, slots), len);
            let last = start + len == slots;
            for (r, (acc, &inv_sum)) in acc.iter().zip(inv_sums).enumerate() {
                for (p, &acc) in acc.iter().enumerate() {
                    let sums = M::sums(acc);
                    let sums = if last { sums.mul(M::Sum::splat(inv_sum)) } else { sums };
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
    fn the_tests_small_caches_split_blocks_into_groups_and_chunks() {
        // 97 tokens are 104 in AVX2's panels; 37 query rows.
        let [_, medium, small] = crate::caches::for_tests();
        assert_eq!(Walk::new::<Avx2, 2>(&medium, 104, 37), Walk { group_rows: 18, value_slots: 64 });
        assert_eq!(Walk::new::<Avx2, 2>(&small, 104, 37), Walk { group_rows: 6, value_slots: 16 });
        // A block smaller than what fits is one group.
        assert_eq!(Walk::new::<Avx2, 2>(&small, 8, 5).group_rows, 6);
    }
}
