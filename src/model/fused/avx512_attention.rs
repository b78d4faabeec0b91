//! One block of query rows through softmax(Q Kᵀ · scale) V with AVX-512
//! register tiles, for heads of 64 dimensions (every DINO and DINOv2 size).
//!
//! The GEMM path re-packs all of a head's keys and values for every block,
//! and its scores (block rows x tokens) live in L2. Here keys are packed once
//! per layer, in the panels the kernel reads, and six query rows go through
//! scores, softmax and P·V while their scores (six rows x tokens, 29 KB at
//! 1201 tokens) stay in L1.

use std::arch::x86_64::*;
use std::mem::MaybeUninit;

use super::{HeadMajor, softmax_numerators_portable};

/// Dimensions per head that the tiles are written for: four vectors.
pub(super) const HEAD_DIM: usize = 64;
/// Keys per panel: one vector of scores.
pub(super) const KEY_PANEL: usize = 16;
/// Query rows per tile: P·V keeps 6 x 4 accumulators, plus four value
/// vectors and a broadcast, in the 32 vector registers.
const TILE_ROWS: usize = 6;
/// Key panels per step of the score tile: 6 x 4 accumulators again.
const PANELS_PER_STEP: usize = 4;

pub(super) fn available(head_dim: usize) -> bool {
    head_dim == HEAD_DIM && std::arch::is_x86_feature_detected!("avx512f")
}

/// Like the GEMM path's `attend_block`: query rows `first..` of all heads
/// into `out` (rows x hidden); returns row 0's probabilities for every head
/// when `keep_first_row`.
///
/// # Safety
/// The CPU must have AVX-512F ([`available`]); `heads` packed with
/// [`KEY_PANEL`]-wide panels of [`HEAD_DIM`] dimensions from `qkv`, and
/// `first + out.len() / hidden <= heads.tokens`.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn attend_block(
    qkv: &[f32],
    heads: &HeadMajor,
    out: &mut [MaybeUninit<f32>],
    first: usize,
    scale: f32,
    keep_first_row: bool,
) -> Vec<f32> {
    let HeadMajor { tokens, num_heads, .. } = *heads;
    let d = num_heads * HEAD_DIM;
    let rows = out.len() / d;
    let panels = tokens.div_ceil(KEY_PANEL);
    let padded = panels * KEY_PANEL;
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
                    1 => tile.run::<1>(&mut scores),
                    2 => tile.run::<2>(&mut scores),
                    3 => tile.run::<3>(&mut scores),
                    4 => tile.run::<4>(&mut scores),
                    5 => tile.run::<5>(&mut scores),
                    _ => tile.run::<TILE_ROWS>(&mut scores),
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
    /// AVX-512F; R rows of `q` and `out` at their strides, `panels` key
    /// panels and `tokens` value rows readable.
    #[target_feature(enable = "avx512f")]
    unsafe fn run<const R: usize>(&self, scores: &mut [f32]) -> f32 {
        let padded = self.panels * KEY_PANEL;
        let mut panel = 0;
        // SAFETY: the caller's contract; scores holds TILE_ROWS >= R rows of `padded`.
        unsafe {
            while panel + PANELS_PER_STEP <= self.panels {
                self.scores::<R, PANELS_PER_STEP>(panel, scores.as_mut_ptr(), padded);
                panel += PANELS_PER_STEP;
            }
            for panel in panel..self.panels {
                self.scores::<R, 1>(panel, scores.as_mut_ptr(), padded);
            }
        }
        let mut inv_sums = [0f32; R];
        for (row, inv_sum) in scores.chunks_mut(padded).zip(&mut inv_sums) {
            softmax_numerators_portable(&mut row[..self.tokens], self.tokens, std::slice::from_mut(inv_sum));
        }
        // SAFETY: as above.
        unsafe { self.mix::<R>(scores.as_ptr(), padded, &inv_sums) };
        inv_sums[0]
    }

    /// scores[r][keys of panels panel..panel+P] = scale · q[r] · k.
    #[inline(always)]
    unsafe fn scores<const R: usize, const P: usize>(&self, panel: usize, scores: *mut f32, padded: usize) {
        // SAFETY: (all pointer reads and writes) the caller's contract.
        unsafe {
            let keys = self.keys.add(panel * HEAD_DIM * KEY_PANEL);
            let mut acc = [[_mm512_setzero_ps(); P]; R];
            for c in 0..HEAD_DIM {
                let mut k = [_mm512_setzero_ps(); P];
                for (p, k) in k.iter_mut().enumerate() {
                    *k = _mm512_loadu_ps(keys.add((p * HEAD_DIM + c) * KEY_PANEL));
                }
                for (r, acc) in acc.iter_mut().enumerate() {
                    let q = _mm512_set1_ps(*self.q.add(r * self.q_stride + c));
                    for (acc, &k) in acc.iter_mut().zip(&k) {
                        *acc = _mm512_fmadd_ps(q, k, *acc);
                    }
                }
            }
            let scale = _mm512_set1_ps(self.scale);
            for (r, acc) in acc.iter().enumerate() {
                for (p, &acc) in acc.iter().enumerate() {
                    _mm512_storeu_ps(scores.add(r * padded + (panel + p) * KEY_PANEL), _mm512_mul_ps(acc, scale));
                }
            }
        }
    }

    /// out[r] = (Σ_t scores[r][t] · v[t]) / Σ_r.
    #[inline(always)]
    unsafe fn mix<const R: usize>(&self, scores: *const f32, padded: usize, inv_sums: &[f32; R]) {
        const VECTORS: usize = HEAD_DIM / 16;
        // SAFETY: (all pointer reads and writes) the caller's contract.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); VECTORS]; R];
            for t in 0..self.tokens {
                let mut v = [_mm512_setzero_ps(); VECTORS];
                for (i, v) in v.iter_mut().enumerate() {
                    *v = _mm512_loadu_ps(self.values.add(t * HEAD_DIM + i * 16));
                }
                for (r, acc) in acc.iter_mut().enumerate() {
                    let p = _mm512_set1_ps(*scores.add(r * padded + t));
                    for (acc, &v) in acc.iter_mut().zip(&v) {
                        *acc = _mm512_fmadd_ps(p, v, *acc);
                    }
                }
            }
            for (r, (acc, &inv_sum)) in acc.iter().zip(inv_sums).enumerate() {
                let inv_sum = _mm512_set1_ps(inv_sum);
                for (i, &acc) in acc.iter().enumerate() {
                    _mm512_storeu_ps(self.out.add(r * self.out_stride + i * 16), _mm512_mul_ps(acc, inv_sum));
                }
            }
        }
    }
}
