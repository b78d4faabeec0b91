//! softmax(Q Kᵀ · scale) V without materializing the attention matrix: a
//! block of query rows at a time, per head, straight out of the fused qkv
//! projection and straight into the (tokens, hidden) layout the output
//! projection reads. Blocks run in parallel; each block's scores stay in
//! cache. Heads of 64 dimensions run on register tiles where the CPU has
//! AVX-512 or AVX2 + FMA; the rest on two gemm-crate products per head.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use crate::ShapeError;
use crate::buffers::{Strided, Unwritten, overwrite_product, panel_slot};
use crate::matmul::Precision;
#[cfg(target_arch = "x86_64")]
use crate::matmul::bf16_pair;
use crate::rows::softmax_numerators;
#[cfg(target_arch = "x86_64")]
use crate::simd::{self, Avx2, Avx512, Bf16Isa, Isa, Vector, Width};
#[cfg(target_arch = "x86_64")]
use crate::tile_attention;

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
    let rows = batch * tokens;
    if rows == 0 || num_heads == 0 || !qkv.len().is_multiple_of(rows * 3 * num_heads) {
        return Err(ShapeError::new(format!("attention: {} values for {rows} rows of {num_heads} heads", qkv.len())));
    }
    let head_dim = qkv.len() / rows / 3 / num_heads;
    let kernel = AttentionKernel::best(head_dim, precision);
    Ok(attention_with(kernel, qkv, (batch, tokens), num_heads, scale, keep_cls_row))
}

/// What computes a block of query rows.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum AttentionKernel {
    /// Two GEMMs per head around a softmax pass; any CPU, any head size.
    Gemm,
    /// Register tiles of six query rows, for 64 dimensions per head: scores,
    /// softmax and mixing stay in registers and L1.
    #[cfg(target_arch = "x86_64")]
    Tiles(Isa),
    /// The same tiles on bfloat16 pairs (`tile_attention::Bf16Math`).
    #[cfg(target_arch = "x86_64")]
    Bf16Tiles(Bf16Isa),
}

impl std::fmt::Display for AttentionKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Gemm => f.write_str("gemm crate around a softmax pass"),
            #[cfg(target_arch = "x86_64")]
            Self::Tiles(isa) => write!(f, "register tiles, {isa}"),
            #[cfg(target_arch = "x86_64")]
            Self::Bf16Tiles(_) => f.write_str("bfloat16 register tiles, AVX512-BF16"),
        }
    }
}

impl AttentionKernel {
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    pub(crate) fn best(head_dim: usize, precision: Precision) -> Self {
        #[cfg(target_arch = "x86_64")]
        if head_dim == tile_attention::HEAD_DIM {
            if let (Precision::Bf16, Some(isa)) = (precision, simd::bf16()) {
                return Self::Bf16Tiles(isa);
            }
            if let Some(isa) = simd::widest() {
                return Self::Tiles(isa);
            }
        }
        Self::Gemm
    }

    /// Kᵀ and V laid out as the kernel reads them.
    fn head_major(self, qkv: &[f32], tokens: usize, num_heads: usize, head_dim: usize) -> HeadMajor {
        match self {
            Self::Gemm => HeadMajor::new(qkv, tokens, num_heads, head_dim, (tokens, head_dim)),
            #[cfg(target_arch = "x86_64")]
            Self::Tiles(isa) => HeadMajor::new(qkv, tokens, num_heads, head_dim, (isa.lanes(), isa.lanes())),
            #[cfg(target_arch = "x86_64")]
            Self::Bf16Tiles(_) => HeadMajor::pairs(qkv, tokens, num_heads, head_dim),
        }
    }

    fn attend_block(self, block: QueryBlock) -> Vec<f32> {
        match self {
            Self::Gemm => attend_block(block),
            // SAFETY: an `Isa` is made only for an instruction set the CPU
            // has; `best` chose tiles for heads of their size, and `heads` is
            // packed with this instruction set's panels.
            #[cfg(target_arch = "x86_64")]
            Self::Tiles(isa) => match isa.width() {
                Width::Avx512 => unsafe { tile_attention::attend_block::<Avx512, { Avx512::TILE_PANELS }>(block) },
                Width::Avx2 => unsafe { tile_attention::attend_block::<Avx2, { Avx2::TILE_PANELS }>(block) },
            },
            // SAFETY: a `Bf16Isa` is made only where the CPU has AVX512-BF16;
            // `best` chose it for 64-dimension heads, and `heads` is packed in pairs.
            #[cfg(target_arch = "x86_64")]
            Self::Bf16Tiles(_) => unsafe {
                tile_attention::attend_block::<tile_attention::Bf16Math, { Avx512::TILE_PANELS }>(block)
            },
        }
    }
}

pub(crate) fn attention_with(
    kernel: AttentionKernel,
    data: &[f32],
    (batch, tokens): (usize, usize),
    num_heads: usize,
    scale: f32,
    keep_cls_row: bool,
) -> Attended {
    let three_d = data.len() / (batch * tokens);
    let d = three_d / 3;
    let head_dim = d / num_heads;
    let mut cls_rows = vec![0f32; if keep_cls_row { batch * num_heads * tokens } else { 0 }];
    let mixed = {
        let mut out = Unwritten::new(batch * tokens * d);
        for (b, out) in out.slots().chunks_mut(tokens * d).enumerate() {
            let data = &data[b * tokens * three_d..(b + 1) * tokens * three_d];
            let heads = kernel.head_major(data, tokens, num_heads, head_dim);
            let rows = block_rows(tokens);
            let first_rows: Vec<Vec<f32>> = out
                .par_chunks_mut(rows * d)
                .enumerate()
                .map(|(block, out)| {
                    let keep_first_row = block == 0 && keep_cls_row;
                    kernel.attend_block(QueryBlock {
                        qkv: data,
                        heads: &heads,
                        out,
                        first: block * rows,
                        scale,
                        keep_first_row,
                    })
                })
                .collect();
            if keep_cls_row {
                let per_batch = num_heads * tokens;
                cls_rows[b * per_batch..(b + 1) * per_batch].copy_from_slice(&first_rows[0]);
            }
        }
        // SAFETY: every block wrote all of its rows, every head its columns.
        unsafe { out.assume_written() }
    };
    Attended { mixed, cls_rows: keep_cls_row.then_some(cls_rows) }
}

/// Keys and values copied out of the interleaved qkv rows once per layer, per
/// head: Kᵀ (head_dim, tokens) and V (tokens, head_dim), each in
/// [`panel_slot`]'s column panels, Kᵀ's zero past the last token. With one
/// panel as wide as the matrix, they are the plain row-major operands the
/// GEMM reads. Read in place, the keys form a column-major operand that the
/// GEMM re-gathers element by element for every block.
pub(crate) struct HeadMajor {
    pub(crate) keys_t: Vec<f32>,
    pub(crate) values: Vec<f32>,
    pub(crate) tokens: usize,
    pub(crate) num_heads: usize,
    pub(crate) head_dim: usize,
}

impl HeadMajor {
    /// `key_panel` columns (tokens) per panel of Kᵀ, `value_panel` columns
    /// (dimensions, a divisor of head_dim) per panel of V.
    fn new(
        qkv: &[f32],
        tokens: usize,
        num_heads: usize,
        head_dim: usize,
        (key_panel, value_panel): (usize, usize),
    ) -> Self {
        let d = num_heads * head_dim;
        let padded = tokens.next_multiple_of(key_panel);
        let mut keys_t = Unwritten::new(num_heads * padded * head_dim);
        let mut values = Unwritten::new(num_heads * tokens * head_dim);
        let per_head_chunks =
            keys_t.slots().par_chunks_mut(padded * head_dim).zip(values.slots().par_chunks_mut(tokens * head_dim));
        per_head_chunks.enumerate().for_each(|(head, (keys_t, values))| {
            let key_slots = |t: usize| (0..head_dim).map(move |c| panel_slot(c, t, head_dim, key_panel));
            for (t, row) in qkv.chunks_exact(3 * d).enumerate() {
                let key = &row[d + head * head_dim..d + (head + 1) * head_dim];
                for (slot, &k) in key_slots(t).zip(key) {
                    keys_t[slot].write(k);
                }
                let value = &row[2 * d + head * head_dim..2 * d + (head + 1) * head_dim];
                for (panel, part) in value.chunks(value_panel).enumerate() {
                    let start = panel_slot(t, panel * value_panel, tokens, value_panel);
                    values[start..start + value_panel].write_copy_of_slice(part);
                }
            }
            for slot in (tokens..padded).flat_map(key_slots) {
                keys_t[slot].write(0.0);
            }
        });
        // SAFETY: each head's loops wrote all padded · head_dim of its keys
        // (each key's dimensions, zeros past the last) and all
        // tokens · head_dim of its values.
        let (keys_t, values) = unsafe { (keys_t.assume_written(), values.assume_written()) };
        Self { keys_t, values, tokens, num_heads, head_dim }
    }
}

#[cfg(target_arch = "x86_64")]
impl HeadMajor {
    /// Kᵀ and V in the bfloat16 pairs of `tile_attention::Bf16Math`: Kᵀ in
    /// panels of 16 tokens whose rows are pairs of dimensions, zero past the
    /// last token; V in panels of 16 dimensions whose rows are pairs of
    /// tokens, a last odd token paired with zero.
    fn pairs(qkv: &[f32], tokens: usize, num_heads: usize, head_dim: usize) -> Self {
        const LANES: usize = 16;
        let d = num_heads * head_dim;
        let (padded, token_pairs, dim_pairs) = (tokens.next_multiple_of(LANES), tokens.div_ceil(2), head_dim / 2);
        let mut keys_t = Unwritten::new(num_heads * padded * dim_pairs);
        let mut values = Unwritten::new(num_heads * token_pairs * head_dim);
        let per_head_chunks = keys_t
            .slots()
            .par_chunks_mut(padded * dim_pairs)
            .zip(values.slots().par_chunks_mut(token_pairs * head_dim));
        per_head_chunks.enumerate().for_each(|(head, (keys_t, values))| {
            let part = |t: usize, part: usize| &qkv[t * 3 * d + part * d + head * head_dim..][..head_dim];
            for t in 0..padded {
                let (panel, lane) = (t / LANES, t % LANES);
                for j in 0..dim_pairs {
                    let slot = (panel * dim_pairs + j) * LANES + lane;
                    keys_t[slot].write(if t < tokens {
                        bf16_pair(part(t, 1)[2 * j], part(t, 1)[2 * j + 1])
                    } else {
                        0.0
                    });
                }
            }
            for u in 0..token_pairs {
                let (first, second) = (part(2 * u, 2), (2 * u + 1 < tokens).then(|| part(2 * u + 1, 2)));
                for c in 0..head_dim {
                    let slot = ((c / LANES) * token_pairs + u) * LANES + c % LANES;
                    values[slot].write(bf16_pair(first[c], second.map_or(0.0, |v| v[c])));
                }
            }
        });
        // SAFETY: each head's loops wrote every slot of its keys (each padded
        // token's dimension pairs) and of its values (each token pair's dimensions).
        let (keys_t, values) = unsafe { (keys_t.assume_written(), values.assume_written()) };
        Self { keys_t, values, tokens, num_heads, head_dim }
    }
}

/// Query rows `first..` of all heads, written to `out` (rows x hidden), for
/// an attention kernel.
pub(crate) struct QueryBlock<'a> {
    pub(crate) qkv: &'a [f32],
    pub(crate) heads: &'a HeadMajor,
    pub(crate) out: &'a mut [MaybeUninit<f32>],
    pub(crate) first: usize,
    pub(crate) scale: f32,
    /// Return row 0's probabilities for every head.
    pub(crate) keep_first_row: bool,
}

/// The block with two GEMMs per head around a softmax pass.
fn attend_block(block: QueryBlock) -> Vec<f32> {
    let QueryBlock { qkv, heads, out, first, scale, keep_first_row } = block;
    let HeadMajor { tokens, num_heads, head_dim, .. } = *heads;
    let d = num_heads * head_dim;
    let rows = out.len() / d;
    let mut scores = Vec::with_capacity(rows * tokens);
    let mut inv_sums = vec![0f32; rows];
    let mut mixed = Vec::with_capacity(rows * head_dim);
    let mut first_row = Vec::with_capacity(if keep_first_row { num_heads * tokens } else { 0 });
    for head in 0..num_heads {
        let q = qkv[first * 3 * d + head * head_dim..].as_ptr();
        let k_t = heads.keys_t[head * tokens * head_dim..].as_ptr();
        let v = heads.values[head * tokens * head_dim..].as_ptr();
        // SAFETY: every index touched is inside `qkv`, `heads` or `scores`:
        // rows < tokens - first, columns < head_dim, keys < tokens, with the
        // strides of the (token, 3, heads, head_dim), (head_dim, tokens) and
        // (tokens, head_dim) layouts; the product writes all of `scores`.
        unsafe {
            // scores (rows x tokens) = scale · Q_block (rows x hd) · Kᵀ (hd x tokens)
            overwrite_product(
                (rows, tokens, head_dim),
                scores.as_mut_ptr(),
                tokens,
                Strided::row_major(q, 3 * d),
                Strided::row_major(k_t, tokens),
                scale,
            );
            scores.set_len(rows * tokens);
        }
        softmax_numerators(&mut scores, tokens, &mut inv_sums);
        if keep_first_row {
            first_row.extend(scores[..tokens].iter().map(|p| p * inv_sums[0]));
        }
        // SAFETY: as above, for the (rows x hd) output, which the product writes whole.
        unsafe {
            // mixed (rows x hd) = P (rows x tokens) · V (tokens x hd)
            overwrite_product(
                (rows, head_dim, tokens),
                mixed.as_mut_ptr(),
                head_dim,
                Strided::row_major(scores.as_ptr(), tokens),
                Strided::row_major(v, head_dim),
                1.0,
            );
            mixed.set_len(rows * head_dim);
        }
        let columns = out.chunks_mut(d).map(|row| &mut row[head * head_dim..(head + 1) * head_dim]);
        for ((out, mixed), inv_sum) in columns.zip(mixed.chunks(head_dim)).zip(&inv_sums) {
            out.iter_mut().zip(mixed).for_each(|(o, m)| {
                o.write(m * inv_sum);
            });
        }
    }
    first_row
}

#[cfg(test)]
mod tests {
    use super::*;

    /// softmax(q kᵀ · scale) v per head, one value at a time, with q, k, v
    /// and the softmax numerators (not their sum) passed through `round`
    /// first, as a kernel multiplying in lower precision rounds them.
    fn naive_attention(
        qkv: &[f32],
        tokens: usize,
        num_heads: usize,
        scale: f32,
        round: fn(f32) -> f32,
    ) -> (Vec<f32>, Vec<f32>) {
        let d = qkv.len() / tokens / 3;
        let head_dim = d / num_heads;
        let at = |t: usize, part: usize, head: usize, c: usize| round(qkv[t * 3 * d + part * d + head * head_dim + c]);
        let mut mixed = vec![0f32; tokens * d];
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
                    mixed[t * d + head * head_dim + c] =
                        (0..tokens).map(|u| round(numerators[u]) * at(u, 2, head, c)).sum::<f32>() / sum;
                }
                if t == 0 {
                    cls.extend(numerators.iter().map(|n| n / sum));
                }
            }
        }
        (mixed, cls)
    }

    #[test]
    fn attention_kernels_match_the_formula() {
        // Heads of 64 dimensions, the size the tiles take. Token counts from
        // one to several key panels and row tiles, full and partial, odd
        // (a bfloat16 pair of tokens half empty) and even.
        #[cfg(target_arch = "x86_64")]
        let kernels: Vec<AttentionKernel> = std::iter::once(AttentionKernel::Gemm)
            .chain(simd::usable().map(AttentionKernel::Tiles))
            .chain(simd::bf16().map(AttentionKernel::Bf16Tiles))
            .collect();
        #[cfg(not(target_arch = "x86_64"))]
        let kernels = vec![AttentionKernel::Gemm];
        for tokens in [1, 2, 5, 6, 7, 16, 17, 37, 97] {
            for num_heads in [1, 3] {
                let data = crate::noise(tokens * 3 * num_heads * 64, (tokens * 10 + num_heads) as u64);
                for &kernel in &kernels {
                    // In bfloat16, an exp a few ulp off may round a numerator
                    // the other way: 2^-8 of one term, rarely more than 1e-4 here.
                    let (round, tolerance): (fn(f32) -> f32, f32) = match kernel {
                        #[cfg(target_arch = "x86_64")]
                        AttentionKernel::Bf16Tiles(_) => (crate::matmul::bf16_rounded, 5e-4),
                        _ => (|v| v, 1e-5),
                    };
                    let (expected_mixed, expected_cls) = naive_attention(&data, tokens, num_heads, 0.125, round);
                    let Attended { mixed, cls_rows } =
                        attention_with(kernel, &data, (1, tokens), num_heads, 0.125, true);
                    let cls = cls_rows.unwrap();
                    for (ours, expected) in [(mixed, &expected_mixed), (cls, &expected_cls)] {
                        assert_eq!(ours.len(), expected.len());
                        for (a, e) in ours.iter().zip(expected) {
                            assert!(
                                (a - e).abs() < tolerance,
                                "{kernel:?}, {tokens} tokens, {num_heads} heads: {a} vs {e}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn shapes_that_do_not_fit_are_errors() {
        assert!(attention(&[0.0; 10], (1, 3), 1, 1.0, false, Precision::F32).is_err());
        assert!(attention(&[], (0, 3), 1, 1.0, false, Precision::F32).is_err());
    }
}
