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

/// The block in tiles of six query rows.
///
/// # Safety
/// The CPU must have M's instruction set; `heads` packed from `qkv` in
/// M's panels (lanes wide, M::PER_SLOT rows per slot), with heads of
/// [`HEAD_DIM`] dimensions, and `first + out.len() / hidden <= heads.tokens`.
pub(crate) unsafe fn attend_block<M: TileMath, const P: usize>(block: QueryBlock, laps: &mut Laps) -> Vec<f32> {
    // SAFETY: the caller's contract.
    unsafe {
        M::Operand::enter(
            #[inline(always)]
            || attend_tiles::<M, P>(block, laps),
        )
    }
}

/// [`attend_block`]'s work, inlined into its instruction-set context.
///
/// # Safety
/// As [`attend_block`]: it reads and writes through pointers into `block`
/// that only that contract keeps in bounds.
#[inline(always)]
unsafe fn attend_tiles<M: TileMath, const P: usize>(block: QueryBlock, laps: &mut Laps) -> Vec<f32> {
    let QueryBlock { qkv, heads, out, first, scale, keep_first_row } = block;
    let HeadMajor { tokens, num_heads, .. } = *heads;
    let lanes = M::Operand::LANES;
    let d = num_heads * HEAD_DIM;
    let rows = out.len() / d;
    let panels = tokens.div_ceil(lanes);
    let padded = panels * lanes;
    let mut scores = vec![0f32; TILE_ROWS * padded];
    let mut buffers = Buffers::default();
    let mut first_row = Vec::with_capacity(if keep_first_row { num_heads * tokens } else { 0 });
    for head in 0..num_heads {
        let keys = heads.keys_t[head * padded * HEAD_DIM / M::PER_SLOT..].as_ptr();
        let values = heads.values[head * tokens.div_ceil(M::PER_SLOT) * HEAD_DIM..].as_ptr();
        for start in (0..rows).step_by(TILE_ROWS) {
            let q = qkv[(first + start) * 3 * d + head * HEAD_DIM..].as_ptr();
            let out = out[start * d + head * HEAD_DIM..].as_mut_ptr().cast::<f32>();
            let tile = Tile { q, q_stride: 3 * d, keys, panels, values, tokens, out, out_stride: d, scale };
            // SAFETY: the tile's rows are block rows, inside `qkv` and `out`
            // by the caller's contract; keys hold `panels` panels per head and
            // values `tokens` rows, as packed.
            let inv_sums = unsafe {
                match rows - start {
                    1 => tile.run::<M, 1, P>(&mut scores, &mut buffers, laps),
                    2 => tile.run::<M, 2, P>(&mut scores, &mut buffers, laps),
                    3 => tile.run::<M, 3, P>(&mut scores, &mut buffers, laps),
                    4 => tile.run::<M, 4, P>(&mut scores, &mut buffers, laps),
                    5 => tile.run::<M, 5, P>(&mut scores, &mut buffers, laps),
                    _ => tile.run::<M, TILE_ROWS, P>(&mut scores, &mut buffers, laps),
                }
            };
            if keep_first_row && start == 0 {
                first_row.extend(scores[..tokens].iter().map(|p| p * inv_sums));
            }
        }
    }
    first_row
}

/// Where a tile's queries and softmax numerators are converted to, when its
/// products read them converted.
#[derive(Default)]
struct Buffers {
    queries: Vec<f32>,
    numerators: Vec<f32>,
}

/// Up to [`TILE_ROWS`] query rows of one head.
struct Tile {
    q: *const f32,
    q_stride: usize,
    keys: *const f32,
    panels: usize,
    values: *const f32,
    tokens: usize,
    out: *mut f32,
    out_stride: usize,
    scale: f32,
}

impl Tile {
    /// Writes the tile's R output rows; leaves R rows of softmax numerators
    /// in `scores` and returns the first row's 1/Σ.
    ///
    /// # Safety
    /// M's instruction set; R rows of `q` and `out` at their strides,
    /// `panels` key panels and the value panels readable.
    #[inline(always)]
    unsafe fn run<M: TileMath, const R: usize, const P: usize>(
        &self,
        scores: &mut [f32],
        buffers: &mut Buffers,
        laps: &mut Laps,
    ) -> f32 {
        let padded = self.panels * M::Operand::LANES;
        let mut panel = 0;
        // SAFETY: the caller's contract; scores holds TILE_ROWS >= R rows of `padded`.
        unsafe {
            let queries = M::operands(self.q, self.q_stride, R, HEAD_DIM, &mut buffers.queries);
            while panel + P <= self.panels {
                self.scores::<M, R, P>(queries, panel, scores.as_mut_ptr(), padded);
                panel += P;
            }
            for panel in panel..self.panels {
                self.scores::<M, R, 1>(queries, panel, scores.as_mut_ptr(), padded);
            }
        }
        laps.lap(Stage::Scores);
        let mut inv_sums = [0f32; R];
        for (row, inv_sum) in scores.chunks_mut(padded).zip(&mut inv_sums) {
            // SAFETY: as above.
            *inv_sum = unsafe { simd::softmax_numerators::<M::Sum>(&mut row[..self.tokens]) };
        }
        laps.lap(Stage::Softmax);
        // SAFETY: as above; HEAD_DIM is a multiple of P panels on every
        // instruction set.
        unsafe {
            let numerators = M::operands(scores.as_ptr(), padded, R, self.tokens, &mut buffers.numerators);
            for panel in (0..HEAD_DIM / M::Operand::LANES).step_by(P) {
                self.mix::<M, R, P>(numerators, panel, &inv_sums);
            }
        }
        laps.lap(Stage::Mix);
        inv_sums[0]
    }

    /// scores[r][keys of panels panel..panel+P] = scale · q[r] · k, for
    /// `queries` (where, and how far apart) as M's products read them.
    ///
    /// # Safety
    /// M's instruction set; R rows of queries readable; panels
    /// `panel..panel + P` of the keys readable; `scores` writable for R rows
    /// of `padded`, which covers those panels.
    #[inline(always)]
    unsafe fn scores<M: TileMath, const R: usize, const P: usize>(
        &self,
        (queries, stride): (*const f32, usize),
        panel: usize,
        scores: *mut f32,
        padded: usize,
    ) {
        let (lanes, depth) = (M::Operand::LANES, HEAD_DIM / M::PER_SLOT);
        // SAFETY: (all pointer reads and writes) the caller's contract.
        unsafe {
            let keys = self.keys.add(panel * depth * lanes);
            let acc = tile_product::<M::Operand, R, P>(queries, stride, keys, depth);
            let scale = M::Sum::splat(self.scale);
            for (r, acc) in acc.iter().enumerate() {
                for (p, &acc) in acc.iter().enumerate() {
                    M::sums(acc).mul(scale).store(scores.add(r * padded + (panel + p) * lanes));
                }
            }
        }
    }

    /// out[r][dimensions of panels panel..panel+P] = (Σ_t numerators[r][t] ·
    /// v[t]) / Σ_r, for `numerators` (where, and how far apart) as M's
    /// products read them.
    ///
    /// # Safety
    /// M's instruction set; R rows of numerators readable, each covering the
    /// tokens; panels `panel..panel + P` of the values readable; R rows of
    /// `out` writable at `out_stride` over those panels.
    #[inline(always)]
    unsafe fn mix<M: TileMath, const R: usize, const P: usize>(
        &self,
        (numerators, stride): (*const f32, usize),
        panel: usize,
        inv_sums: &[f32; R],
    ) {
        let (lanes, depth) = (M::Operand::LANES, self.tokens.div_ceil(M::PER_SLOT));
        // SAFETY: (all pointer reads and writes) the caller's contract.
        unsafe {
            let values = self.values.add(panel * depth * lanes);
            let acc = tile_product::<M::Operand, R, P>(numerators, stride, values, depth);
            for (r, (acc, &inv_sum)) in acc.iter().zip(inv_sums).enumerate() {
                let inv_sum = M::Sum::splat(inv_sum);
                for (p, &acc) in acc.iter().enumerate() {
                    M::sums(acc).mul(inv_sum).store(self.out.add(r * self.out_stride + (panel + p) * lanes));
                }
            }
        }
    }
}
