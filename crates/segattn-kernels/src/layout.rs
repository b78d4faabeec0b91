//! How the kernels lay out their operands: the panels every tiled product
//! reads its right-hand side in, bfloat16 pairs, and the keys and values of
//! a layer's heads that the attention kernels share.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use crate::buffers::LineAligned;

/// What the linear layers and the attention multiply in. Sums are f32
/// either way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    #[default]
    F32,
    /// x and W rounded to bfloat16 (8 bits of mantissa), on CPUs with
    /// AVX512-BF16: twice the products per instruction.
    Bf16,
}

/// Where (row, column) of a `rows`-row matrix goes when the matrix is laid
/// out in panels of `width` columns, each (rows, width) row-major, one after
/// the other: the layout every tiled product reads its right-hand side in
/// (one vector a panel), and with one panel as wide as the matrix, plain
/// row-major.
pub(crate) fn panel_slot(row: usize, column: usize, rows: usize, width: usize) -> usize {
    (column / width * rows + row) * width + column % width
}

/// `low` and `high` as a bfloat16 pair in the bits of an f32 ([`Bf16Pairs`]).
pub(crate) fn bf16_pair(low: f32, high: f32) -> f32 {
    f32::from_bits(u32::from(bf16_bits(low)) | u32::from(bf16_bits(high)) << 16)
}

/// f32 to bfloat16, rounded to nearest even as `vcvtneps2bf16` rounds
/// finite values.
pub(crate) fn bf16_bits(value: f32) -> u16 {
    let bits = value.to_bits();
    (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

/// `value` rounded to bfloat16, as an f32: what the bfloat16 kernels
/// multiply, for the tests' references.
#[cfg(test)]
pub(crate) fn bf16_rounded(value: f32) -> f32 {
    f32::from_bits(u32::from(bf16_bits(value)) << 16)
}

/// Keys and values copied out of the interleaved qkv rows once per layer, per
/// head: Kᵀ (head_dim, tokens) and V (tokens, head_dim), each in
/// [`panel_slot`]'s column panels, Kᵀ's zero past the last token. With one
/// panel as wide as the matrix, they are the plain row-major operands the
/// GEMM reads. Read in place, the keys form a column-major operand that the
/// GEMM re-gathers element by element for every block.
pub(crate) struct HeadMajor {
    pub(crate) keys_t: LineAligned,
    pub(crate) values: LineAligned,
    pub(crate) tokens: usize,
    pub(crate) num_heads: usize,
    pub(crate) head_dim: usize,
    /// The attention kernels it was packed for, by name.
    pub(crate) layout: &'static str,
}

impl HeadMajor {
    /// `key_panel` columns (tokens) per panel of Kᵀ, `value_panel` columns
    /// (dimensions, a divisor of head_dim) per panel of V.
    pub(crate) fn new(
        qkv: &[f32],
        tokens: usize,
        num_heads: usize,
        head_dim: usize,
        (key_panel, value_panel): (usize, usize),
    ) -> Self {
        let d = num_heads * head_dim;
        let padded = tokens.next_multiple_of(key_panel);
        let mut keys_t = LineAligned::unwritten(num_heads * padded * head_dim);
        let mut values = LineAligned::unwritten(num_heads * tokens * head_dim);
        let per_head_chunks =
            keys_t.slots().par_chunks_mut(padded * head_dim).zip(values.slots().par_chunks_mut(tokens * head_dim));
        per_head_chunks.enumerate().for_each(|(head, (keys_t, values))| {
            // Token t's dimensions, key_panel apart in its panel: the
            // division in `panel_slot` once per token, not per value.
            let key_slots = |t: usize| {
                let first = panel_slot(0, t, head_dim, key_panel);
                (0..head_dim).map(move |c| first + c * key_panel)
            };
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
        Self { keys_t, values, tokens, num_heads, head_dim, layout: "" }
    }
}

impl HeadMajor {
    /// Kᵀ and V in bfloat16 pairs, as the bfloat16 tiles read them: Kᵀ in
    /// panels of `LANES` tokens whose rows are pairs of dimensions, zero past
    /// the last token; V in panels of `LANES` dimensions whose rows are pairs
    /// of tokens, a last odd token paired with zero.
    pub(crate) fn pairs<const LANES: usize>(qkv: &[f32], tokens: usize, num_heads: usize, head_dim: usize) -> Self {
        let d = num_heads * head_dim;
        let (padded, token_pairs, dim_pairs) = (tokens.next_multiple_of(LANES), tokens.div_ceil(2), head_dim / 2);
        let mut keys_t = LineAligned::unwritten(num_heads * padded * dim_pairs);
        let mut values = LineAligned::unwritten(num_heads * token_pairs * head_dim);
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
        Self { keys_t, values, tokens, num_heads, head_dim, layout: "" }
    }
}

/// Query rows `first..` of all heads, written to `out` (rows x hidden), for
/// an attention kernel.
pub(crate) struct QueryBlock<'a> {
    pub(crate) qkv: &'a [f32],
    pub(crate) heads: &'a HeadMajor,
    pub(crate) out: &'a mut [MaybeUninit<f32>],
    pub(crate) first: usize,
    /// The attention's scale times log2 e: every kernel keeps its scores
    /// in base 2 and takes the softmax numerators as 2^(s - max).
    pub(crate) scale: f32,
    /// Return row 0's probabilities for every head.
    pub(crate) keep_first_row: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bfloat16_rounds_to_nearest_even() {
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: even is 1. 1 + 3·2^-8
        // is halfway between 1 + 2^-7 and 1 + 2^-6: even is the latter.
        assert_eq!(bf16_bits(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(bf16_bits(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(bf16_bits(1.0 + 1.0 / 256.0 + 1e-6), 0x3f81);
        assert_eq!(bf16_bits(-2.0), 0xc000);
    }

    #[test]
    fn every_table_packs_keys_and_values_from_a_line() {
        let (tokens, heads) = (37, 2);
        let qkv = crate::noise(tokens * 3 * heads * 64, 5);
        for kernels in crate::dispatch::Kernels::all_here() {
            let packed = kernels.pack_heads(&qkv, tokens, heads, 64);
            for values in [&packed.keys_t, &packed.values] {
                assert_eq!(values.as_ptr() as usize % 64, 0, "{kernels:?}");
            }
        }
    }
}
