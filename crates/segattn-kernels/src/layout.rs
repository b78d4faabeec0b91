//! How the kernels lay out their operands: the panels every tiled product
//! reads its right-hand side in, bfloat16 pairs, and the keys and values of
//! a layer's heads that the attention kernels share.

use std::marker::PhantomData;
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
/// row-major. The packings are written for speed; the tests hold them to
/// this.
#[cfg(test)]
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
/// head: Kᵀ (head_dim, tokens) and V (tokens, head_dim), plain row-major as
/// the GEMM reads them ([`HeadMajor::row_major`]) or in the column panels of
/// `panel_slot` that the tiles read ([`HeadMajor::in_panels`]). Read in
/// place, the keys form a column-major operand that the GEMM re-gathers
/// element by element for every block.
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
    /// Kᵀ and V of each head, plain row-major.
    pub(crate) fn row_major(qkv: &[f32], tokens: usize, num_heads: usize, head_dim: usize) -> Self {
        let d = num_heads * head_dim;
        let mut keys_t = LineAligned::unwritten(num_heads * tokens * head_dim);
        let mut values = LineAligned::unwritten(num_heads * tokens * head_dim);
        let per_head_chunks =
            keys_t.slots().par_chunks_mut(tokens * head_dim).zip(values.slots().par_chunks_mut(tokens * head_dim));
        per_head_chunks.enumerate().for_each(|(head, (keys_t, values))| {
            for (t, row) in qkv.chunks_exact(3 * d).enumerate() {
                for (c, &k) in row[d + head * head_dim..][..head_dim].iter().enumerate() {
                    keys_t[c * tokens + t].write(k);
                }
                let value = &row[2 * d + head * head_dim..][..head_dim];
                values[t * head_dim..][..head_dim].write_copy_of_slice(value);
            }
        });
        // SAFETY: each head's loop wrote every token's column of its keys
        // and row of its values.
        let (keys_t, values) = unsafe { (keys_t.assume_written(), values.assume_written()) };
        Self { keys_t, values, tokens, num_heads, head_dim, layout: "" }
    }

    /// Kᵀ and V of each head in panels of W columns: Kᵀ's of W tokens (zero
    /// past the last), V's of W dimensions (a divisor of head_dim).
    ///
    /// Each task takes a run of whole key panels' tokens and writes them
    /// into every head, a panel of tokens at a time: it reads each qkv row
    /// once, front to back, where a task per head would read a few lines of
    /// every row, a page apart (which no prefetcher follows), once per head.
    pub(crate) fn in_panels<const W: usize>(qkv: &[f32], tokens: usize, num_heads: usize, head_dim: usize) -> Self {
        assert!(head_dim.is_multiple_of(W), "heads of {head_dim} in panels of {W}");
        let (d, padded) = (num_heads * head_dim, tokens.next_multiple_of(W));
        let mut keys_t = LineAligned::unwritten(num_heads * padded * head_dim);
        let mut values = LineAligned::unwritten(num_heads * tokens * head_dim);
        // Some eight tasks a thread, to share out evenly.
        let run = tokens.div_ceil(8 * rayon::current_num_threads()).next_multiple_of(W);
        // Each task's part of every head's keys, and of every head's value panels.
        type Parts<'a> = Vec<&'a mut [MaybeUninit<f32>]>;
        let mut tasks: Vec<(Parts, Parts)> = (0..padded.div_ceil(run)).map(|_| (Vec::new(), Vec::new())).collect();
        for head in keys_t.slots().chunks_mut(padded * head_dim) {
            for ((keys, _), part) in tasks.iter_mut().zip(head.chunks_mut(run * head_dim)) {
                keys.push(part);
            }
        }
        for panel in values.slots().chunks_mut(tokens * W) {
            for ((_, values), part) in tasks.iter_mut().zip(panel.chunks_mut(run * W)) {
                values.push(part);
            }
        }
        tasks.into_par_iter().enumerate().for_each(|(task, (mut keys, mut values))| {
            let zeros = vec![0.0; head_dim];
            let row = |t: usize, part: usize, head: usize| &qkv[t * 3 * d + part * d + head * head_dim..][..head_dim];
            for first in (task * run..padded.min((task + 1) * run)).step_by(W) {
                let at = (first - task * run) * head_dim..(first - task * run + W) * head_dim;
                for (head, keys) in keys.iter_mut().enumerate() {
                    let rows = std::array::from_fn(|lane| match first + lane {
                        t if t < tokens => row(t, 1, head),
                        _ => &zeros[..],
                    });
                    transpose_rows::<W>(rows, &mut keys[at.clone()]);
                }
            }
            for t in task * run..tokens.min((task + 1) * run) {
                let at = (t - task * run) * W;
                // The row's values, head after head: panel i is its W values from i·W.
                let row_values = &qkv[t * 3 * d + 2 * d..][..d];
                for (values, panel) in values.iter_mut().zip(row_values.chunks_exact(W)) {
                    values[at..at + W].write_copy_of_slice(panel);
                }
            }
        });
        // SAFETY: the tasks' runs cover every padded token; each wrote all
        // head_dim rows of its tokens' key panels (zeros past the last
        // token) and every token's W dimensions in each value panel.
        let (keys_t, values) = unsafe { (keys_t.assume_written(), values.assume_written()) };
        Self { keys_t, values, tokens, num_heads, head_dim, layout: "" }
    }
}

/// `out` (depth rows of W) = the transpose of `rows` (W rows of depth
/// values). W is a constant to the compiler, so the loop over a row of
/// `out` unrolls without a branch per value.
pub(crate) fn transpose_rows<const W: usize>(rows: [&[f32]; W], out: &mut [MaybeUninit<f32>]) {
    // Rows cut to the depth: no bounds check per value.
    let rows = rows.map(|row| &row[..out.len() / W]);
    for (k, out) in out.chunks_exact_mut(W).enumerate() {
        for (slot, row) in out.iter_mut().zip(&rows) {
            slot.write(row[k]);
        }
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

/// One head's columns of a block of rows of the attention's output (rows
/// of the heads' columns side by side), which the block's other heads share
/// row by row: each head's part of a block can be a task of its own.
pub(crate) struct HeadColumns<'a> {
    at: *mut MaybeUninit<f32>,
    rows: usize,
    stride: usize,
    width: usize,
    _out: PhantomData<&'a mut [MaybeUninit<f32>]>,
}

// SAFETY: a view is the only one of its values (`HeadColumns::split`),
// and holds the borrow of the buffer they are in.
unsafe impl Send for HeadColumns<'_> {}

impl<'a> HeadColumns<'a> {
    /// `out`'s rows of `heads` heads of `width` columns, cut into each
    /// head's columns, head after head.
    pub(crate) fn split(out: &'a mut [MaybeUninit<f32>], heads: usize, width: usize) -> Vec<Self> {
        let stride = heads * width;
        assert!(stride > 0 && out.len().is_multiple_of(stride), "{} values in rows of {heads} x {width}", out.len());
        let (rows, at) = (out.len() / stride, out.as_mut_ptr());
        // The heads' columns are disjoint, and all inside `out`.
        (0..heads)
            .map(|head| Self { at: at.wrapping_add(head * width), rows, stride, width, _out: PhantomData })
            .collect()
    }

    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    /// Row r's columns.
    pub(crate) fn row(&mut self, r: usize) -> &mut [MaybeUninit<f32>] {
        assert!(r < self.rows, "row {r} of {}", self.rows);
        // SAFETY: row r's columns are inside the buffer, and this view's
        // alone (`split`); the borrow of `self` keeps them so.
        unsafe { std::slice::from_raw_parts_mut(self.at.add(r * self.stride), self.width) }
    }

    /// Where row 0's columns start, and how far apart the rows are: for
    /// kernels that write `rows()` rows of the columns through pointers.
    pub(crate) fn as_mut_ptr(&mut self) -> (*mut f32, usize) {
        (self.at.cast(), self.stride)
    }
}

/// Query rows `first..` of one head, written to `out` (rows x head_dim),
/// for an attention kernel.
pub(crate) struct QueryBlock<'a> {
    pub(crate) qkv: &'a [f32],
    pub(crate) heads: &'a HeadMajor,
    pub(crate) head: usize,
    pub(crate) out: HeadColumns<'a>,
    pub(crate) first: usize,
    /// The attention's scale (positive) times log2 e: every kernel keeps
    /// its scores in base 2 and takes the softmax numerators as 2^(s - max).
    pub(crate) scale: f32,
    /// Return row 0's probabilities.
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
    fn each_heads_columns_are_its_own_and_together_cover_the_rows() {
        let (rows, heads, width) = (5, 3, 4);
        let mut out = vec![MaybeUninit::new(-1.0f32); rows * heads * width];
        for (head, mut columns) in HeadColumns::split(&mut out, heads, width).into_iter().enumerate() {
            assert_eq!(columns.rows(), rows);
            for r in 0..rows {
                let row = columns.row(r);
                assert_eq!(row.len(), width);
                row.iter_mut().for_each(|v| *v = MaybeUninit::new((r * heads + head) as f32));
            }
        }
        for (i, v) in out.iter().enumerate() {
            // SAFETY: every value was initialized above.
            assert_eq!(unsafe { v.assume_init() }, (i / width) as f32, "value {i}");
        }
    }

    #[test]
    fn keys_and_values_are_where_their_panels_put_them() {
        // Fewer tokens than a panel, a panel and one more, several tasks'
        // runs with a partial last panel.
        for tokens in [1, 7, 8, 9, 37, 100] {
            for num_heads in [1, 3] {
                let head_dim = 64;
                let d = num_heads * head_dim;
                let qkv = crate::noise(tokens * 3 * d, tokens as u64);
                let packings: [(HeadMajor, usize, usize); 3] = [
                    (HeadMajor::row_major(&qkv, tokens, num_heads, head_dim), tokens, head_dim),
                    (HeadMajor::in_panels::<8>(&qkv, tokens, num_heads, head_dim), 8, 8),
                    (HeadMajor::in_panels::<16>(&qkv, tokens, num_heads, head_dim), 16, 16),
                ];
                for (packed, key_panel, value_panel) in packings {
                    let padded = tokens.next_multiple_of(key_panel);
                    assert_eq!(packed.keys_t.len(), num_heads * padded * head_dim);
                    assert_eq!(packed.values.len(), num_heads * tokens * head_dim);
                    for head in 0..num_heads {
                        let keys_t = &packed.keys_t[head * padded * head_dim..];
                        let values = &packed.values[head * tokens * head_dim..];
                        for t in 0..padded {
                            for c in 0..head_dim {
                                let key = if t < tokens { qkv[t * 3 * d + d + head * head_dim + c] } else { 0.0 };
                                let at = panel_slot(c, t, head_dim, key_panel);
                                assert_eq!(keys_t[at], key, "{tokens} tokens, panels of {key_panel}: key {t}, {c}");
                                if t < tokens {
                                    let value = qkv[t * 3 * d + 2 * d + head * head_dim + c];
                                    let at = panel_slot(t, c, tokens, value_panel);
                                    assert_eq!(values[at], value, "{tokens} tokens, panels of {value_panel}: {t}, {c}");
                                }
                            }
                        }
                    }
                }
            }
        }
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
