//! One block of query rows through softmax(Q Kᵀ · scale) V with AVX-512
//! register tiles, for heads of 64 dimensions (every DINO and DINOv2 size).
//!
//! The GEMM path re-packs all of a head's keys and values for every block,
//! and its scores (block rows x tokens) live in L2. Here Kᵀ and V are packed
//! once per layer, in the 16-column panels of the matmul kernel, and six
//! query rows go through scores, softmax and P·V, both products on that
//! kernel's tiles, while their scores (six rows x tokens, 29 KB at 1201
//! tokens) stay in L1.

use std::arch::x86_64::*;

use super::avx512_matmul::{PANEL, tile_product};
use super::{HeadMajor, QueryBlock};

/// Dimensions per head that the tiles are written for: four panels of V.
pub(super) const HEAD_DIM: usize = 64;
/// Query rows per tile: P·V keeps 6 x 4 accumulators, plus four value
/// vectors and a broadcast, in the 32 vector registers.
const TILE_ROWS: usize = 6;
/// Key panels per step of the score tile: 6 x 4 accumulators again.
const PANELS_PER_STEP: usize = 4;

pub(super) fn available(head_dim: usize) -> bool {
    head_dim == HEAD_DIM && super::avx512_enabled()
}

/// The block in tiles of six query rows.
///
/// # Safety
/// The CPU must have AVX-512F ([`available`]); `heads` packed from `qkv` in
/// [`PANEL`]-wide panels, with heads of [`HEAD_DIM`] dimensions, and
/// `first + out.len() / hidden <= heads.tokens`.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn attend_block(block: QueryBlock) -> Vec<f32> {
    let QueryBlock { qkv, heads, out, first, scale, keep_first_row } = block;
    let HeadMajor { tokens, num_heads, .. } = *heads;
    let d = num_heads * HEAD_DIM;
    let rows = out.len() / d;
    let panels = tokens.div_ceil(PANEL);
    let padded = panels * PANEL;
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
        let padded = self.panels * PANEL;
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
            *inv_sum = softmax_numerators(&mut row[..self.tokens]);
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
            let keys = self.keys.add(panel * HEAD_DIM * PANEL);
            let acc = tile_product::<R, P>(self.q, self.q_stride, keys, HEAD_DIM);
            let scale = _mm512_set1_ps(self.scale);
            for (r, acc) in acc.iter().enumerate() {
                for (p, &acc) in acc.iter().enumerate() {
                    _mm512_storeu_ps(scores.add(r * padded + (panel + p) * PANEL), _mm512_mul_ps(acc, scale));
                }
            }
        }
    }

    /// out[r] = (Σ_t scores[r][t] · v[t]) / Σ_r.
    #[inline(always)]
    unsafe fn mix<const R: usize>(&self, scores: *const f32, padded: usize, inv_sums: &[f32; R]) {
        // SAFETY: (all pointer reads and writes) the caller's contract.
        unsafe {
            let acc = tile_product::<R, { HEAD_DIM / PANEL }>(scores, padded, self.values, self.tokens);
            for (r, (acc, &inv_sum)) in acc.iter().zip(inv_sums).enumerate() {
                let inv_sum = _mm512_set1_ps(inv_sum);
                for (p, &acc) in acc.iter().enumerate() {
                    _mm512_storeu_ps(self.out.add(r * self.out_stride + p * PANEL), _mm512_mul_ps(acc, inv_sum));
                }
            }
        }
    }
}

/// Softmax of `row` short of its last step, as `super::softmax_numerators`
/// does it: leaves e^(s - max) in the row and returns 1/Σ. The exponential is
/// FMAs and `vscalefps`, 11 instructions a vector against 22 for the
/// portable one, which has no FMA to rely on; four vectors a step keep four
/// sums apart. Softmax went from 11 to 7 % of the attention kernel's
/// samples, ~15 to ~9 ms a forward of ViT-S/16 at 480x640.
#[target_feature(enable = "avx512f")]
fn softmax_numerators(row: &mut [f32]) -> f32 {
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
                let e = exp(_mm512_sub_ps(_mm512_loadu_ps(at.add(i + 16 * j)), max));
                _mm512_storeu_ps(at.add(i + 16 * j), e);
                *sum = _mm512_add_ps(*sum, e);
            }
            i += STEP;
        }
        for i in (i..full).step_by(16) {
            let e = exp(_mm512_sub_ps(_mm512_loadu_ps(at.add(i)), max));
            _mm512_storeu_ps(at.add(i), e);
            sum[0] = _mm512_add_ps(sum[0], e);
        }
        let e = exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, at.add(full)), max));
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
fn exp(x: __m512) -> __m512 {
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
    fn exp_is_close_to_exp() {
        // Without AVX-512 nothing calls this exp: attention takes the GEMM path.
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        let xs: Vec<f32> = (0..1760).map(|i| -(i as f32) * 0.05).chain([-100.0, -1000.0]).collect();
        for x in xs.chunks(16) {
            let mut lanes = [0f32; 16];
            lanes[..x.len()].copy_from_slice(x);
            let mut fast = [0f32; 16];
            // SAFETY: AVX-512F is present, checked above.
            unsafe { _mm512_storeu_ps(fast.as_mut_ptr(), exp(_mm512_loadu_ps(lanes.as_ptr()))) };
            for (&x, &fast) in x.iter().zip(&fast) {
                let exact = (x as f64).exp() as f32;
                assert!((fast - exact).abs() <= 3e-7 * exact + f32::MIN_POSITIVE, "{x}: {fast} vs {exact}");
            }
        }
    }
}
