//! The kernels of every CPU: the gemm crate, called single-threaded on
//! strided operands, for the linear layers and for attention heads of any
//! size.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use crate::buffers::{SharedOut, Strided, overwrite_product};
use crate::caches::Caches;
use crate::layout::{HeadMajor, QueryBlock};
use crate::matmul::Epilogue;
use crate::rows::{bias_gelu_rows, softmax_numerators};
use crate::stages::{Laps, Stage};

/// `out = x · B`, then the epilogue, for B (inputs, outputs) row-major: the
/// bias and GELU in a pass over each task's part. Each task, two per
/// thread, is a single-threaded GEMM over a slice of the output columns. The
/// gemm crate's own threading packs B on the calling thread while the workers
/// wait, then synchronizes them per panel, which costs most on small inputs.
/// The gemm crate blocks x for the caches itself.
pub(crate) fn product(
    x: &[f32],
    inputs: usize,
    b: &[f32],
    outputs: usize,
    epilogue: Epilogue,
    out: &mut [MaybeUninit<f32>],
    _: usize,
) {
    let rows = x.len() / inputs;
    let columns = outputs.div_ceil(2 * rayon::current_num_threads()).next_multiple_of(16);
    let dst = SharedOut(out.as_mut_ptr().cast());
    (0..outputs.div_ceil(columns)).into_par_iter().for_each(|task| {
        let first = task * columns;
        // SAFETY: dst is (rows x outputs) row-major `out`, of which this task
        // writes columns first..first+width; lhs (rows x inputs) row-major is
        // `x`; rhs (inputs x width) is columns first..first+width of B.
        let width = columns.min(outputs - first);
        unsafe {
            overwrite_product(
                (rows, width, inputs),
                dst.at(first),
                outputs,
                Strided::row_major(x.as_ptr(), inputs),
                Strided::row_major(b.as_ptr().add(first), outputs),
                1.0,
            );
        }
        let Some(bias) = epilogue.bias() else { return };
        let (bias, gelu) = (&bias[first..first + width], matches!(epilogue, Epilogue::BiasGelu(_)));
        for row in 0..rows {
            // SAFETY: the task's columns of the row, written just above
            // and by no other task.
            let row = unsafe { std::slice::from_raw_parts_mut(dst.at(row * outputs + first), width) };
            if gelu {
                bias_gelu_rows(row, bias, true);
            } else {
                row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
            }
        }
    });
}

/// The block's head with two GEMMs around a softmax pass.
///
/// # Safety
/// The block's rows and head are among those `block.heads` holds:
/// `first + out.rows() <= tokens` and `head < num_heads`.
pub(crate) unsafe fn attend_block(block: QueryBlock, _: &Caches, laps: &mut Laps) -> Vec<f32> {
    let QueryBlock { qkv, heads, head, mut out, first, scale, keep_first_row } = block;
    let HeadMajor { tokens, num_heads, head_dim, .. } = *heads;
    let d = num_heads * head_dim;
    let rows = out.rows();
    let mut scores = Vec::with_capacity(rows * tokens);
    let mut inv_sums = vec![0f32; rows];
    let mut mixed = Vec::with_capacity(rows * head_dim);
    let q = qkv[first * 3 * d + head * head_dim..].as_ptr();
    let k_t = heads.keys_t[head * tokens * head_dim..].as_ptr();
    let v = heads.values[head * tokens * head_dim..].as_ptr();
    // SAFETY: every index touched is inside `qkv`, `heads` or `scores`:
    // rows <= tokens - first and head < num_heads (the caller's contract),
    // columns < head_dim, keys < tokens, with the
    // strides of the (token, 3, heads, head_dim), (head_dim, tokens) and
    // (tokens, head_dim) layouts; the product writes all of `scores`.
    unsafe {
        // scores (rows x tokens) = scale · Q_block (rows x hd) · Kᵀ (hd x tokens),
        // in base 2 (`QueryBlock::scale`).
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
    laps.lap(Stage::Scores);
    softmax_numerators(&mut scores, tokens, &mut inv_sums);
    let first_row =
        if keep_first_row { scores[..tokens].iter().map(|p| p * inv_sums[0]).collect() } else { Vec::new() };
    laps.lap(Stage::Softmax);
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
    for (r, (mixed, inv_sum)) in mixed.chunks(head_dim).zip(&inv_sums).enumerate() {
        out.row(r).iter_mut().zip(mixed).for_each(|(o, m)| {
            o.write(m * inv_sum);
        });
    }
    laps.lap(Stage::Mix);
    first_row
}
