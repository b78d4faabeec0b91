//! One block of query rows through softmax(Q Kᵀ · scale) V with register
//! tiles, for heads of 64 dimensions (every DINO and DINOv2 size).
//!
//! The GEMM path re-packs all of a head's keys and values for every block,
//! and its scores (block rows x tokens) live in L2. Here Kᵀ and V are packed
//! once per layer, in the one-vector panels of the matmul tiles, and six
//! query rows go through scores, softmax and P·V, both products on those
//! tiles (P panels at a time, as there), while their scores (six rows x
//! tokens, 29 KB at 1201 tokens) stay in L1.

use crate::attention::{HeadMajor, QueryBlock};
use crate::simd::FloatLanes;
use crate::tile_matmul::{TILE_ROWS, tile_product};

/// Dimensions per head that the tiles are written for.
pub(crate) const HEAD_DIM: usize = 64;

/// The block in tiles of six query rows.
///
/// # Safety
/// The CPU must have V's instruction set; `heads` packed from `qkv` in
/// V::LANES-wide panels, with heads of [`HEAD_DIM`] dimensions, and
/// `first + out.len() / hidden <= heads.tokens`.
pub(crate) unsafe fn attend_block<V: FloatLanes, const P: usize>(block: QueryBlock) -> Vec<f32> {
    // SAFETY: the caller's contract.
    unsafe {
        V::enter(
            #[inline(always)]
            || attend_tiles::<V, P>(block),
        )
    }
}

/// [`attend_block`]'s work, inlined into its instruction-set context.
///
/// # Safety
/// As [`attend_block`]: it reads and writes through pointers into `block`
/// that only that contract keeps in bounds.
#[inline(always)]
unsafe fn attend_tiles<V: FloatLanes, const P: usize>(block: QueryBlock) -> Vec<f32> {
    let QueryBlock { qkv, heads, out, first, scale, keep_first_row } = block;
    let HeadMajor { tokens, num_heads, .. } = *heads;
    let d = num_heads * HEAD_DIM;
    let rows = out.len() / d;
    let panels = tokens.div_ceil(V::LANES);
    let padded = panels * V::LANES;
    let mut scores = vec![0f32; TILE_ROWS * padded];
    let mut first_row = Vec::with_capacity(if keep_first_row { num_heads * tokens } else { 0 });
    for head in 0..num_heads {
        let keys = heads.keys_t[head * padded * HEAD_DIM..].as_ptr();
        let values = heads.values[head * tokens * HEAD_DIM..].as_ptr();
        for start in (0..rows).step_by(TILE_ROWS) {
            let q = qkv[(first + start) * 3 * d + head * HEAD_DIM..].as_ptr();
            let out = out[start * d + head * HEAD_DIM..].as_mut_ptr().cast::<f32>();
            let tile = Tile { q, q_stride: 3 * d, keys, panels, values, tokens, out, out_stride: d, scale };
            // SAFETY: the tile's rows are block rows, inside `qkv` and `out`
            // by the caller's contract; keys hold `panels` panels per head and
            // values `tokens` rows, as packed.
            let inv_sums = unsafe {
                match rows - start {
                    1 => tile.run::<V, 1, P>(&mut scores),
                    2 => tile.run::<V, 2, P>(&mut scores),
                    3 => tile.run::<V, 3, P>(&mut scores),
                    4 => tile.run::<V, 4, P>(&mut scores),
                    5 => tile.run::<V, 5, P>(&mut scores),
                    _ => tile.run::<V, TILE_ROWS, P>(&mut scores),
                }
            };
            if keep_first_row && start == 0 {
                first_row.extend(scores[..tokens].iter().map(|p| p * inv_sums));
            }
        }
    }
    first_row
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
    /// V's instruction set; R rows of `q` and `out` at their strides,
    /// `panels` key panels and `tokens` value rows readable.
    #[inline(always)]
    unsafe fn run<V: FloatLanes, const R: usize, const P: usize>(&self, scores: &mut [f32]) -> f32 {
        let padded = self.panels * V::LANES;
        let mut panel = 0;
        // SAFETY: the caller's contract; scores holds TILE_ROWS >= R rows of `padded`.
        unsafe {
            while panel + P <= self.panels {
                self.scores::<V, R, P>(panel, scores.as_mut_ptr(), padded);
                panel += P;
            }
            for panel in panel..self.panels {
                self.scores::<V, R, 1>(panel, scores.as_mut_ptr(), padded);
            }
        }
        let mut inv_sums = [0f32; R];
        for (row, inv_sum) in scores.chunks_mut(padded).zip(&mut inv_sums) {
            // SAFETY: as above.
            *inv_sum = unsafe { V::softmax_numerators(&mut row[..self.tokens]) };
        }
        // SAFETY: as above; HEAD_DIM is a multiple of P panels on both
        // instruction sets.
        unsafe {
            for panel in (0..HEAD_DIM / V::LANES).step_by(P) {
                self.mix::<V, R, P>(panel, scores.as_ptr(), padded, &inv_sums);
            }
        }
        inv_sums[0]
    }

    /// scores[r][keys of panels panel..panel+P] = scale · q[r] · k.
    ///
    /// # Safety
    /// V's instruction set; R rows of `q` readable at `q_stride`; panels
    /// `panel..panel + P` of the keys readable; `scores` writable for R rows
    /// of `padded`, which covers those panels.
    #[inline(always)]
    unsafe fn scores<V: FloatLanes, const R: usize, const P: usize>(
        &self,
        panel: usize,
        scores: *mut f32,
        padded: usize,
    ) {
        // SAFETY: (all pointer reads and writes) the caller's contract.
        unsafe {
            let keys = self.keys.add(panel * HEAD_DIM * V::LANES);
            let acc = tile_product::<V, R, P>(self.q, self.q_stride, keys, HEAD_DIM);
            let scale = V::splat(self.scale);
            for (r, acc) in acc.iter().enumerate() {
                for (p, &acc) in acc.iter().enumerate() {
                    acc.mul(scale).store(scores.add(r * padded + (panel + p) * V::LANES));
                }
            }
        }
    }

    /// out[r][dimensions of panels panel..panel+P] = (Σ_t scores[r][t] · v[t]) / Σ_r.
    ///
    /// # Safety
    /// V's instruction set; R rows of `scores` readable at `padded`, each
    /// holding `tokens` values; panels `panel..panel + P` of the values
    /// readable; R rows of `out` writable at `out_stride` over those panels.
    #[inline(always)]
    unsafe fn mix<V: FloatLanes, const R: usize, const P: usize>(
        &self,
        panel: usize,
        scores: *const f32,
        padded: usize,
        inv_sums: &[f32; R],
    ) {
        // SAFETY: (all pointer reads and writes) the caller's contract.
        unsafe {
            let values = self.values.add(panel * self.tokens * V::LANES);
            let acc = tile_product::<V, R, P>(scores, padded, values, self.tokens);
            for (r, (acc, &inv_sum)) in acc.iter().zip(inv_sums).enumerate() {
                let inv_sum = V::splat(inv_sum);
                for (p, &acc) in acc.iter().enumerate() {
                    acc.mul(inv_sum).store(self.out.add(r * self.out_stride + (panel + p) * V::LANES));
                }
            }
        }
    }
}
