//! softmax(Q Kᵀ · scale) V without materializing the attention matrix: a
//! block of query rows at a time, per head, straight out of the fused qkv
//! projection and straight into the (tokens, hidden) layout the output
//! projection reads. Blocks run in parallel; each block's scores stay in
//! cache. Heads of 64 dimensions run on register tiles where the CPU has
//! AVX-512 or AVX2 + FMA; the rest on two gemm-crate products per head.

use rayon::prelude::*;

use crate::ShapeError;
use crate::buffers::Unwritten;
use crate::caches::{Caches, caches};
use crate::dispatch::Kernels;
use crate::layout::{HeadColumns, Precision, QueryBlock};
use crate::stages::{Laps, Stage, StageTimes};

/// Most query rows per block. On the GEMM path each block re-packs every key
/// and value, so bigger blocks pack less per product, while 256 rows of
/// scores at a few thousand tokens still fit in L3. The tiles pack once per
/// layer; for them blocks only share out the work.
const MAX_BLOCK: usize = 256;

/// Query rows per block: at most [`MAX_BLOCK`], in a number of blocks that
/// is a multiple of the thread count and at least two per thread. Blocks of
/// one size share evenly (five blocks of 256 rows on two threads left one
/// idle for a fifth of the time), and a spare block per thread lets work move
/// off a core that stalls.
fn block_rows(tokens: usize) -> usize {
    let threads = rayon::current_num_threads();
    let blocks = threads * tokens.div_ceil(threads * MAX_BLOCK).max(2);
    tokens.div_ceil(blocks).max(16)
}

/// What [`attention`] returns.
pub struct Attended {
    /// The mixed values, (batch, tokens, hidden): what the output projection reads.
    pub mixed: Vec<f32>,
    /// With `keep_cls_row`, the class token's attention, (batch, heads, tokens).
    pub cls_rows: Option<Vec<f32>>,
}

/// softmax(Q Kᵀ · scale) V per head, for `qkv` of `batch` x `tokens` rows of
/// 3·hidden values laid out as ([q|k|v], head, head_dim), as a fused qkv
/// projection writes them. In [`Precision::Bf16`], where it is available
/// and heads have 64 dimensions, the two products multiply in bfloat16.
pub fn attention(
    qkv: &[f32],
    (batch, tokens): (usize, usize),
    num_heads: usize,
    scale: f32,
    keep_cls_row: bool,
    precision: Precision,
) -> Result<Attended, ShapeError> {
    let kernels = kernels_for(qkv, batch * tokens, num_heads, scale, precision)?;
    Ok(attention_with(kernels, &caches(), qkv, (batch, tokens), num_heads, scale, keep_cls_row, false).0)
}

/// [`attention`], with the time each [`Stage`] took, summed over threads:
/// the same kernels, lapping a stopwatch as they go.
pub fn timed_attention(
    qkv: &[f32],
    (batch, tokens): (usize, usize),
    num_heads: usize,
    scale: f32,
    precision: Precision,
) -> Result<(Attended, StageTimes), ShapeError> {
    let kernels = kernels_for(qkv, batch * tokens, num_heads, scale, precision)?;
    Ok(attention_with(kernels, &caches(), qkv, (batch, tokens), num_heads, scale, false, true))
}

/// The kernels for `qkv` as rows of `num_heads` heads' q, k and v, scaled
/// by `scale`, which must be positive: the tiles find each row's largest
/// score from its largest product q·k.
fn kernels_for(
    qkv: &[f32],
    rows: usize,
    num_heads: usize,
    scale: f32,
    precision: Precision,
) -> Result<&'static Kernels, ShapeError> {
    if rows == 0 || num_heads == 0 || !qkv.len().is_multiple_of(rows * 3 * num_heads) {
        return Err(ShapeError::new(format!("attention: {} values for {rows} rows of {num_heads} heads", qkv.len())));
    }
    if !(scale > 0.0 && scale.is_finite()) {
        return Err(ShapeError::new(format!("attention: a scale of {scale}, where a positive number is needed")));
    }
    let head_dim = qkv.len() / rows / 3 / num_heads;
    Ok(Kernels::best_attention(head_dim, precision))
}

/// The work of [`attention`], on `kernels`, blocked for `caches`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_with(
    kernels: &Kernels,
    caches: &Caches,
    data: &[f32],
    (batch, tokens): (usize, usize),
    num_heads: usize,
    scale: f32,
    keep_cls_row: bool,
    timed: bool,
) -> (Attended, StageTimes) {
    let three_d = data.len() / (batch * tokens);
    let d = three_d / 3;
    let head_dim = d / num_heads;
    let scale = scale * std::f32::consts::LOG2_E;
    let mut cls_rows = vec![0f32; if keep_cls_row { batch * num_heads * tokens } else { 0 }];
    let mut times = StageTimes::default();
    let mixed = {
        let mut out = Unwritten::new(batch * tokens * d);
        for (b, out) in out.slots().chunks_mut(tokens * d).enumerate() {
            let data = &data[b * tokens * three_d..(b + 1) * tokens * three_d];
            let start = timed.then(std::time::Instant::now);
            let heads = kernels.pack_heads(data, tokens, num_heads, head_dim);
            if let Some(start) = start {
                // The packing shares its heads out over the pool: its wall
                // time on every thread, as the blocks' times are summed.
                times.charge(Stage::Pack, start.elapsed() * rayon::current_num_threads() as u32);
            }
            let rows = block_rows(tokens);
            // A task per block and head, each a job of its own, which an idle
            // thread can take while it has not started (as
            // `tile_matmul::product`'s tasks): heads, rather than smaller
            // blocks, make the tasks small enough to share out evenly.
            let tasks: Vec<(usize, usize, HeadColumns)> = out
                .chunks_mut(rows * d)
                .enumerate()
                .flat_map(|(block, out)| {
                    let columns = HeadColumns::split(out, num_heads, head_dim);
                    columns.into_iter().enumerate().map(move |(head, out)| (block, head, out))
                })
                .collect();
            let results: Vec<(Vec<f32>, StageTimes)> = tasks
                .into_par_iter()
                .with_max_len(1)
                .map(|(block, head, out)| {
                    let keep_first_row = block == 0 && keep_cls_row;
                    let mut laps = Laps::new(timed);
                    let first = block * rows;
                    let query_block = QueryBlock { qkv: data, heads: &heads, head, out, first, scale, keep_first_row };
                    (kernels.attend_block(query_block, caches, &mut laps), laps.times())
                })
                .collect();
            for (_, task_times) in &results {
                times.add(*task_times);
            }
            if keep_cls_row {
                // Block 0's tasks come first, head after head.
                for (head, (row, _)) in results[..num_heads].iter().enumerate() {
                    cls_rows[(b * num_heads + head) * tokens..][..tokens].copy_from_slice(row);
                }
            }
        }
        // SAFETY: every block wrote all of its rows, every head its columns.
        unsafe { out.assume_written() }
    };
    (Attended { mixed, cls_rows: keep_cls_row.then_some(cls_rows) }, times)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What [`naive_attention`] computes.
    struct Expected {
        mixed: Vec<f32>,
        /// Σ_u p(u) · |v(u)| for each value of `mixed`: how far rounding
        /// each probability p by a fraction moves it, at most.
        spread: Vec<f32>,
        cls: Vec<f32>,
    }

    /// softmax(q kᵀ · scale) v per head, one value at a time, with q, k, v
    /// and the softmax numerators (not their sum) passed through `round`
    /// first, as a kernel multiplying in lower precision rounds them.
    fn naive_attention(qkv: &[f32], tokens: usize, num_heads: usize, scale: f32, round: fn(f32) -> f32) -> Expected {
        let d = qkv.len() / tokens / 3;
        let head_dim = d / num_heads;
        let at = |t: usize, part: usize, head: usize, c: usize| round(qkv[t * 3 * d + part * d + head * head_dim + c]);
        let mut mixed = vec![0f32; tokens * d];
        let mut spread = vec![0f32; tokens * d];
        let mut cls = Vec::new();
        for head in 0..num_heads {
            for t in 0..tokens {
                let scores: Vec<f32> = (0..tokens)
                    .map(|u| (0..head_dim).map(|c| at(t, 0, head, c) * at(u, 1, head, c)).sum::<f32>() * scale)
                    .collect();
                let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let numerators: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f32 = numerators.iter().sum();
                for c in 0..head_dim {
                    let i = t * d + head * head_dim + c;
                    mixed[i] = (0..tokens).map(|u| round(numerators[u]) * at(u, 2, head, c)).sum::<f32>() / sum;
                    spread[i] = (0..tokens).map(|u| numerators[u] * at(u, 2, head, c).abs()).sum::<f32>() / sum;
                }
                if t == 0 {
                    cls.extend(numerators.iter().map(|n| n / sum));
                }
            }
        }
        Expected { mixed, spread, cls }
    }

    #[test]
    fn attention_kernels_match_the_formula() {
        // Heads of 64 dimensions, the size the tiles take. Token counts from
        // one to several key panels and row tiles, full and partial, odd
        // (a bfloat16 pair of tokens half empty) and even.
        for tokens in [1, 2, 5, 6, 7, 16, 17, 37, 97] {
            for num_heads in [1, 3] {
                let data = crate::noise(tokens * 3 * num_heads * 64, (tokens * 10 + num_heads) as u64);
                for (kernels, caches) in
                    Kernels::all_here().into_iter().flat_map(|k| crate::caches::for_tests().map(|c| (k, c)))
                {
                    // In bfloat16 the kernels round e^(s - the largest score
                    // so far), the reference e^(s - the row's largest): each
                    // within 2^-8 of it, so the two P·V differ by up to 2^-7
                    // of Σ p·|v|.
                    let (round, slack): (fn(f32) -> f32, f32) = match kernels.precision {
                        Precision::Bf16 => (crate::layout::bf16_rounded, 1.0 / 128.0),
                        Precision::F32 => (|v| v, 0.0),
                    };
                    let expected = naive_attention(&data, tokens, num_heads, 0.125, round);
                    let (Attended { mixed, cls_rows }, _) =
                        attention_with(kernels, &caches, &data, (1, tokens), num_heads, 0.125, true, false);
                    let cls = cls_rows.unwrap();
                    let no_spread = vec![0.0; cls.len()];
                    let pairs = [(mixed, &expected.mixed, &expected.spread), (cls, &expected.cls, &no_spread)];
                    for (ours, expected, spread) in pairs {
                        assert_eq!(ours.len(), expected.len());
                        for ((a, e), spread) in ours.iter().zip(expected).zip(spread) {
                            assert!(
                                (a - e).abs() < 1e-5 + slack * spread,
                                "{kernels:?}, {caches:?}, {tokens} tokens, {num_heads} heads: {a} vs {e}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn scores_far_below_zero_keep_their_softmax() {
        // Every score about 115 below zero (in base 2), each key's 1.15 below
        // the one before: a softmax taken from a largest score of 0 (the zero
        // keys that pad a last panel, say) would floor every numerator alike.
        for tokens in [5, 37, 97] {
            let d = 64;
            let mut data = crate::noise(tokens * 3 * d, tokens as u64);
            for (t, row) in data.chunks_mut(3 * d).enumerate() {
                row[..d].fill(1.0);
                row[d..2 * d].fill(-(10.0 + 0.1 * t as f32));
            }
            for (kernels, caches) in
                Kernels::all_here().into_iter().flat_map(|k| crate::caches::for_tests().map(|c| (k, c)))
            {
                // As in `attention_kernels_match_the_formula`.
                let (round, slack): (fn(f32) -> f32, f32) = match kernels.precision {
                    Precision::Bf16 => (crate::layout::bf16_rounded, 1.0 / 128.0),
                    Precision::F32 => (|v| v, 0.0),
                };
                let expected = naive_attention(&data, tokens, 1, 0.125, round);
                let (Attended { mixed, .. }, _) =
                    attention_with(kernels, &caches, &data, (1, tokens), 1, 0.125, false, false);
                for ((a, e), spread) in mixed.iter().zip(&expected.mixed).zip(&expected.spread) {
                    assert!(
                        (a - e).abs() < 1e-4 + slack * spread,
                        "{kernels:?}, {caches:?}, {tokens} tokens: {a} vs {e}"
                    );
                }
            }
        }
    }

    #[test]
    fn shapes_that_do_not_fit_are_errors() {
        assert!(attention(&[0.0; 10], (1, 3), 1, 1.0, false, Precision::F32).is_err());
        assert!(attention(&[], (0, 3), 1, 1.0, false, Precision::F32).is_err());
        for scale in [0.0, -0.125, f32::NAN, f32::INFINITY] {
            assert!(attention(&[0.0; 3], (1, 1), 1, scale, false, Precision::F32).is_err());
        }
        assert!(attention(&[0.0; 3], (1, 1), 1, 0.125, false, Precision::F32).is_ok());
    }
}
