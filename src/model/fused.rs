//! Fused CPU kernels. softmax(Q Kᵀ · scale) V without materializing the attention
//! matrix: a block of query rows at a time, per head, straight out of the
//! fused qkv projection and straight into the (tokens, hidden) layout the
//! output projection reads. Blocks run in parallel; each block's scores stay
//! in cache. And the passes between the matrix products, one each: the MLP's
//! bias + GELU, and a block's residual update with the LayerNorm after it.

use std::mem::MaybeUninit;

use anyhow::{Context, Result, bail};
use candle_core::{Storage, Tensor};
use gemm::{Parallelism, gemm};
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
mod simd;
#[cfg(target_arch = "x86_64")]
mod tile_attention;
#[cfg(target_arch = "x86_64")]
mod tile_matmul;

#[cfg(target_arch = "x86_64")]
use simd::{Avx2, Avx512, Isa, Vector, Width};

/// `fn name(args) = portable`: `name` runs `portable` compiled for the widest
/// vectors the CPU has (AVX-512, else AVX2 + FMA, else baseline) that
/// SEGATTN_KERNELS allows, chosen at run time as the kernels are
/// ([`simd::widest`]), so one plain-Rust loop gets each machine's vector width.
macro_rules! widest_vectors {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),*) = $portable:ident) => {
        $(#[$doc])*
        fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn avx512($($arg: $ty),*) {
                    $portable($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) {
                    $portable($($arg),*)
                }
                match simd::widest().map(Isa::width) {
                    // SAFETY: an `Isa` is made only for an instruction set the CPU has.
                    Some(Width::Avx512) => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above.
                    Some(Width::Avx2) => return unsafe { avx2($($arg),*) },
                    None => {}
                }
            }
            $portable($($arg),*)
        }
    };
}

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

/// `e^x` for x <= 0 (to 5e-6 relative error down to x = -87), in plain
/// arithmetic that the compiler vectorizes: libm's `expf` is a call per
/// element, and so is `round`, hence the 1.5·2²³ rounding trick. It also
/// yields n as an integer in the low mantissa bits, because `n as i32`
/// (saturating) compiles to a scalar conversion per element.
#[inline(always)]
fn fast_exp(x: f32) -> f32 {
    const ROUNDER: f32 = 12_582_912.0;
    let y = x.max(-87.0) * std::f32::consts::LOG2_E;
    let shifted = y + ROUNDER;
    let n = shifted - ROUNDER;
    let n_int = shifted.to_bits().wrapping_sub(ROUNDER.to_bits()) as i32;
    let f = y - n;
    // 2^f on [-0.5, 0.5]: Taylor series of e^(f·ln 2) to degree 6.
    let p = 1.0
        + f * (std::f32::consts::LN_2
            + f * (0.240_226_5 + f * (0.055_504_11 + f * (0.009_618_129 + f * (0.001_333_355 + f * 0.000_154_035_3)))));
    f32::from_bits(((n_int + 127) << 23) as u32) * p
}

/// Lanes of independent partial results, so reductions vectorize.
const LANES: usize = 16;

/// Softmax of each `tokens`-long row, short of its last step: leaves
/// e^(s - max) in the row and writes 1/Σ to `inv_sums`. Dividing the
/// (rows x head_dim) output by Σ after P·V is head_dim/tokens of the work
/// of dividing every probability (1/19 for ViT-S/16 at 480x640).
#[inline(always)]
fn softmax_numerators_portable(scores: &mut [f32], tokens: usize, inv_sums: &mut [f32]) {
    for (row, inv_sum) in scores.chunks_mut(tokens).zip(inv_sums) {
        let mut max = [f32::NEG_INFINITY; LANES];
        let mut chunks = row.chunks_exact(LANES);
        for chunk in &mut chunks {
            for (m, &v) in max.iter_mut().zip(chunk) {
                *m = if v > *m { v } else { *m };
            }
        }
        let max = chunks.remainder().iter().chain(&max).copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = [0f32; LANES];
        let mut chunks = row.chunks_exact_mut(LANES);
        for chunk in &mut chunks {
            for (s, v) in sum.iter_mut().zip(chunk.iter_mut()) {
                *v = fast_exp(*v - max);
                *s += *v;
            }
        }
        let mut total: f32 = sum.iter().sum();
        for v in chunks.into_remainder() {
            *v = fast_exp(*v - max);
            total += *v;
        }
        *inv_sum = 1.0 / total;
    }
}

widest_vectors! {
    fn softmax_numerators(scores: &mut [f32], tokens: usize, inv_sums: &mut [f32]) = softmax_numerators_portable
}

/// erf(x) by Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7, plus
/// `fast_exp`'s), branch-free so that it vectorizes.
#[inline(always)]
fn fast_erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t * (0.254_829_6 + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152 + t * 1.061_405_4))));
    (1.0 - poly * fast_exp(-a * a)).copysign(x)
}

/// tanh(x) through one `fast_exp` of a non-positive argument.
#[inline(always)]
fn fast_tanh(x: f32) -> f32 {
    let e = fast_exp(-2.0 * x.abs());
    ((1.0 - e) / (1.0 + e)).copysign(x)
}

#[inline(always)]
fn bias_gelu_portable(values: &mut [f32], bias: &[f32], exact: bool) {
    for row in values.chunks_mut(bias.len()) {
        for (v, b) in row.iter_mut().zip(bias) {
            let x = *v + b;
            *v = if exact {
                0.5 * x * (1.0 + fast_erf(x * std::f32::consts::FRAC_1_SQRT_2))
            } else {
                0.5 * x * (1.0 + fast_tanh(0.797_884_6 * (x + 0.044_715 * x * x * x)))
            };
        }
    }
}

widest_vectors! {
    fn bias_gelu_rows(values: &mut [f32], bias: &[f32], exact: bool) = bias_gelu_portable
}

/// Rows per parallel task: enough to amortize the task, few enough to share.
const ROWS_PER_TASK: usize = 32;

/// GELU(x + bias) over the rows of `values` (…, bias.len()), in place, in
/// parallel: the exact (erf) form, or the tanh approximation.
pub fn bias_gelu(values: &mut [f32], bias: &Tensor, exact: bool) -> Result<()> {
    let bias: Vec<f32> = bias.to_vec1()?;
    values.par_chunks_mut(bias.len() * ROWS_PER_TASK).for_each(|rows| bias_gelu_rows(rows, &bias, exact));
    Ok(())
}

/// Adds `bias` to every row of `values` (…, bias.len()), in place, in parallel.
pub fn add_bias(values: &mut [f32], bias: &Tensor) -> Result<()> {
    let bias: Vec<f32> = bias.to_vec1()?;
    values.par_chunks_mut(bias.len() * ROWS_PER_TASK).for_each(|rows| {
        for row in rows.chunks_mut(bias.len()) {
            row.iter_mut().zip(&bias).for_each(|(v, b)| *v += b);
        }
    });
    Ok(())
}

/// A buffer of `len` values that is written whole before anything reads it,
/// so it is never zeroed first. Its slots are exactly `len` long, even where
/// the allocation holds more.
struct Unwritten {
    buffer: Vec<f32>,
    len: usize,
}

impl Unwritten {
    fn new(len: usize) -> Self {
        Self { buffer: Vec::with_capacity(len), len }
    }

    fn slots(&mut self) -> &mut [MaybeUninit<f32>] {
        &mut self.buffer.spare_capacity_mut()[..self.len]
    }

    /// # Safety
    /// Every one of the `len` slots has been written.
    unsafe fn assume_written(mut self) -> Vec<f32> {
        // SAFETY: the caller's contract; the capacity is at least `len`.
        unsafe { self.buffer.set_len(self.len) };
        self.buffer
    }
}

/// A row-major matrix operand as the GEMM reads it: a pointer and the
/// distance, in values, between rows.
#[derive(Clone, Copy)]
struct Strided {
    at: *const f32,
    row_stride: usize,
}

impl Strided {
    fn row_major(at: *const f32, row_stride: usize) -> Self {
        Self { at, row_stride }
    }
}

/// `dst = scale · lhs · rhs` on the calling thread, for lhs (m x k) and rhs
/// (k x n), into a row-major dst with rows `dst_row_stride` apart. dst is
/// only written, never read, so it may be uninitialized; afterwards all of
/// its m x n values are (given k > 0).
///
/// # Safety
/// Every value addressed through the operands' strides must be in bounds,
/// dst's writable and not overlapping lhs or rhs.
unsafe fn overwrite_product(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_row_stride: usize,
    lhs: Strided,
    rhs: Strided,
    scale: f32,
) {
    // SAFETY: the caller's contract.
    unsafe {
        gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_row_stride as isize,
            false,
            lhs.at,
            1,
            lhs.row_stride as isize,
            rhs.at,
            1,
            rhs.row_stride as isize,
            0.0,
            scale,
            false,
            false,
            false,
            Parallelism::None,
        )
    }
}

/// A buffer shared by parallel tasks that each write their own disjoint
/// part of it (columns, or blocks of rows and columns).
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);

// SAFETY: tasks write disjoint values, and the buffer outlives them.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// Where (row, column) of a `rows`-row matrix goes when the matrix is laid
/// out in panels of `width` columns, each (rows, width) row-major, one after
/// the other: the layout every tiled product reads its right-hand side in
/// (one vector a panel), and with one panel as wide as the matrix, plain
/// row-major.
fn panel_slot(row: usize, column: usize, rows: usize, width: usize) -> usize {
    (column / width * rows + row) * width + column % width
}

/// A linear layer's W, (outputs, inputs) as stored, laid out once at load the
/// way its product reads it: Wᵀ (inputs, outputs) in [`panel_slot`]'s column
/// panels, zero past the last output. Read as stored, W would be packed by
/// the GEMM on every call.
pub struct PackedWeight {
    panels: Vec<f32>,
    kernel: MatmulKernel,
    inputs: usize,
    outputs: usize,
}

/// What computes `x · W`.
#[derive(Clone, Copy, Debug, PartialEq)]
enum MatmulKernel {
    /// The gemm crate, on Wᵀ as one panel; any CPU.
    Gemm,
    /// Register tiles on W in one-vector panels.
    #[cfg(target_arch = "x86_64")]
    Tiles(Isa),
}

impl std::fmt::Display for MatmulKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Gemm => f.write_str("gemm crate"),
            #[cfg(target_arch = "x86_64")]
            Self::Tiles(isa) => write!(f, "register tiles, {isa}"),
        }
    }
}

impl MatmulKernel {
    fn best() -> Self {
        #[cfg(target_arch = "x86_64")]
        if let Some(isa) = simd::widest() {
            return Self::Tiles(isa);
        }
        Self::Gemm
    }

    fn panel_width(self, outputs: usize) -> usize {
        match self {
            Self::Gemm => outputs,
            #[cfg(target_arch = "x86_64")]
            Self::Tiles(isa) => isa.lanes(),
        }
    }
}

impl PackedWeight {
    pub fn new(weight: &Tensor) -> Result<Self> {
        Self::for_kernel(weight, MatmulKernel::best())
    }

    /// Each task writes 32 rows of the packed panels, one output column at a
    /// time, so every read is a 128-byte run of a row of W.
    fn for_kernel(weight: &Tensor, kernel: MatmulKernel) -> Result<Self> {
        const STRIP: usize = 32;
        let (outputs, inputs) = weight.dims2()?;
        let width = kernel.panel_width(outputs).max(1);
        let panel_rows = outputs.div_ceil(width) * inputs;
        cpu_slice(weight, |w| {
            let mut panels = Unwritten::new(panel_rows * width);
            panels.slots().par_chunks_mut(STRIP * width).enumerate().for_each(|(strip, out)| {
                let first = strip * STRIP;
                let rows = (first..first + out.len() / width).map(|q| (q / inputs * width, q % inputs));
                let rows: Vec<(usize, usize)> = rows.collect();
                for lane in 0..width {
                    for (r, &(panel_start, input)) in rows.iter().enumerate() {
                        let output = panel_start + lane;
                        out[r * width + lane].write(if output < outputs { w[output * inputs + input] } else { 0.0 });
                    }
                }
            });
            // SAFETY: each strip wrote every lane of each of its rows.
            let panels = unsafe { panels.assume_written() };
            Ok(Self { panels, kernel, inputs, outputs })
        })
    }

    pub fn outputs(&self) -> usize {
        self.outputs
    }
}

/// `x · Wᵀ` for `x` (…, inputs). The product goes into a fresh buffer that
/// the kernel writes once: candle's matmul zeroes its output first, in a
/// serial pass that leaves the other cores idle.
pub fn matmul(x: &Tensor, weight: &PackedWeight) -> Result<Vec<f32>> {
    let PackedWeight { inputs, outputs, .. } = *weight;
    cpu_slice(x, |x| {
        if inputs == 0 || x.len() % inputs != 0 {
            bail!("matmul: {} values are not rows of {inputs}", x.len());
        }
        let rows = x.len() / inputs;
        let mut product = Unwritten::new(rows * outputs);
        match weight.kernel {
            MatmulKernel::Gemm => gemm_product(x, inputs, &weight.panels, outputs, product.slots()),
            // SAFETY: an `Isa` is made only for an instruction set the CPU
            // has, and `for_kernel` packed the panels for this one.
            #[cfg(target_arch = "x86_64")]
            MatmulKernel::Tiles(isa) => match isa.width() {
                Width::Avx512 => unsafe {
                    tile_matmul::product::<Avx512, { Avx512::TILE_PANELS }>(
                        x,
                        inputs,
                        &weight.panels,
                        outputs,
                        product.slots(),
                    )
                },
                Width::Avx2 => unsafe {
                    tile_matmul::product::<Avx2, { Avx2::TILE_PANELS }>(
                        x,
                        inputs,
                        &weight.panels,
                        outputs,
                        product.slots(),
                    )
                },
            },
        }
        // SAFETY: either kernel writes every value of the product when inputs > 0.
        Ok(unsafe { product.assume_written() })
    })
}

/// `out = x · B` for B (inputs, outputs) row-major. Each task, two per
/// thread, is a single-threaded GEMM over a slice of the output columns. The
/// gemm crate's own threading packs B on the calling thread while the workers
/// wait, then synchronizes them per panel, which costs most on small inputs.
fn gemm_product(x: &[f32], inputs: usize, b: &[f32], outputs: usize, out: &mut [MaybeUninit<f32>]) {
    let rows = x.len() / inputs;
    let columns = outputs.div_ceil(2 * rayon::current_num_threads()).next_multiple_of(16);
    let dst = SharedOut(out.as_mut_ptr().cast());
    (0..outputs.div_ceil(columns)).into_par_iter().for_each(|task| {
        let first = task * columns;
        // SAFETY: dst is (rows x outputs) row-major `out`, of which this task
        // writes columns first..first+width; lhs (rows x inputs) row-major is
        // `x`; rhs (inputs x width) is columns first..first+width of B.
        unsafe {
            overwrite_product(
                (rows, columns.min(outputs - first), inputs),
                dst.at(first),
                outputs,
                Strided::row_major(x.as_ptr(), inputs),
                Strided::row_major(b.as_ptr().add(first), outputs),
                1.0,
            );
        }
    });
}

/// A LayerNorm's parameters, as the layer holds them.
pub struct Norm<'a> {
    pub weight: &'a Tensor,
    pub bias: &'a Tensor,
    pub eps: f32,
}

/// A LayerNorm's parameters, as the row kernels read them.
struct NormRows {
    weight: Vec<f32>,
    bias: Vec<f32>,
    eps: f32,
}

impl NormRows {
    fn new(norm: &Norm) -> Result<Self> {
        Ok(Self { weight: norm.weight.to_vec1()?, bias: norm.bias.to_vec1()?, eps: norm.eps })
    }
}

/// What is added to the residual stream: `γ·(update + bias)`, γ the layer scale if any.
struct Update {
    bias: Vec<f32>,
    gamma: Option<Vec<f32>>,
}

/// Normalizes `x` into `normed`, writing every value of it.
#[inline(always)]
fn norm_row(x: &[f32], normed: &mut [MaybeUninit<f32>], norm: &NormRows) {
    // Two passes over a row that is in L1: the mean, then the centred
    // variance, which stays exact where E[x²] - E[x]² would cancel.
    let width = x.len() as f32;
    let mut sum = [0f32; LANES];
    for chunk in x.chunks(LANES) {
        sum.iter_mut().zip(chunk).for_each(|(s, v)| *s += v);
    }
    let mean = sum.iter().sum::<f32>() / width;
    let mut squares = [0f32; LANES];
    for chunk in x.chunks(LANES) {
        squares.iter_mut().zip(chunk).for_each(|(s, v)| *s += (v - mean) * (v - mean));
    }
    let inv_std = 1.0 / (squares.iter().sum::<f32>() / width + norm.eps).sqrt();
    for (((n, v), w), b) in normed.iter_mut().zip(x).zip(&norm.weight).zip(&norm.bias) {
        n.write((v - mean) * inv_std * w + b);
    }
}

#[inline(always)]
fn norm_rows_portable(x: &[f32], normed: &mut [MaybeUninit<f32>], norm: &NormRows) {
    let width = norm.weight.len();
    for (x, normed) in x.chunks(width).zip(normed.chunks_mut(width)) {
        norm_row(x, normed, norm);
    }
}

widest_vectors! {
    fn norm_rows(x: &[f32], normed: &mut [MaybeUninit<f32>], norm: &NormRows) = norm_rows_portable
}

/// `sum` holds the update on entry and `x + γ·(update + bias)` on return;
/// each of its rows is then normalized into `normed`.
#[inline(always)]
fn residual_norm_rows_portable(
    x: &[f32],
    sum: &mut [f32],
    normed: &mut [MaybeUninit<f32>],
    update: &Update,
    norm: &NormRows,
) {
    let width = norm.weight.len();
    for ((x, sum), normed) in x.chunks(width).zip(sum.chunks_mut(width)).zip(normed.chunks_mut(width)) {
        match &update.gamma {
            Some(gamma) => {
                for (((s, x), b), g) in sum.iter_mut().zip(x).zip(&update.bias).zip(gamma) {
                    *s = x + g * (*s + b);
                }
            }
            None => {
                for ((s, x), b) in sum.iter_mut().zip(x).zip(&update.bias) {
                    *s = x + (*s + b);
                }
            }
        }
        norm_row(sum, normed, norm);
    }
}

widest_vectors! {
    fn residual_norm_rows(x: &[f32], sum: &mut [f32], normed: &mut [MaybeUninit<f32>], update: &Update, norm: &NormRows)
        = residual_norm_rows_portable
}

/// LayerNorm over the last dimension.
pub fn layer_norm(x: &Tensor, norm: &Norm) -> Result<Tensor> {
    let norm = NormRows::new(norm)?;
    let chunk = norm.weight.len() * ROWS_PER_TASK;
    let normed = cpu_slice(x, |x| {
        let mut normed = Unwritten::new(x.len());
        let tasks = x.par_chunks(chunk).zip(normed.slots().par_chunks_mut(chunk));
        tasks.for_each(|(x, normed)| norm_rows(x, normed, &norm));
        // SAFETY: the chunks cover all x.len() values and `norm_row` writes each.
        Ok(unsafe { normed.assume_written() })
    })?;
    Ok(Tensor::from_vec(normed, x.shape(), x.device())?)
}

/// The residual update `x + γ·(update + bias)` (γ: the layer scale, if any)
/// and the LayerNorm that reads it next, in one pass. `update` is `x`'s
/// shape and becomes the new `x`; returns it and its normalized copy.
pub fn residual_layer_norm(
    x: &Tensor,
    mut update: Vec<f32>,
    bias: &Tensor,
    gamma: Option<&Tensor>,
    norm: &Norm,
) -> Result<(Tensor, Tensor)> {
    let norm = NormRows::new(norm)?;
    let residual = Update { bias: bias.to_vec1()?, gamma: gamma.map(|g| g.to_vec1()).transpose()? };
    let chunk = norm.weight.len() * ROWS_PER_TASK;
    let normed = cpu_slice(x, |x| {
        if update.len() != x.len() {
            bail!("residual update has {} values for {} tokens", update.len(), x.len());
        }
        let mut normed = Unwritten::new(x.len());
        let tasks = (x.par_chunks(chunk).zip(update.par_chunks_mut(chunk))).zip(normed.slots().par_chunks_mut(chunk));
        tasks.for_each(|((x, sum), normed)| residual_norm_rows(x, sum, normed, &residual, &norm));
        // SAFETY: the chunks cover all x.len() values and `norm_row` writes each.
        Ok(unsafe { normed.assume_written() })
    })?;
    Ok((Tensor::from_vec(update, x.shape(), x.device())?, Tensor::from_vec(normed, x.shape(), x.device())?))
}

fn cpu_slice<T>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<T>) -> Result<T> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else { bail!("fused kernels run on the CPU only") };
    let (start, end) = layout.contiguous_offsets().context("fused kernels need contiguous tensors")?;
    f(&cpu.as_slice::<f32>()?[start..end])
}

/// Attention over `qkv` of shape (B, tokens, 3·hidden) laid out as
/// (token, [q|k|v], head, head_dim). Returns the mixed values (B, tokens,
/// hidden) and, when `keep_cls_row`, the class token's attention (B, heads, 1, tokens).
pub fn attention(qkv: &Tensor, num_heads: usize, scale: f32, keep_cls_row: bool) -> Result<(Tensor, Option<Tensor>)> {
    let head_dim = qkv.dim(2)? / 3 / num_heads;
    attention_with(AttentionKernel::best(head_dim), qkv, num_heads, scale, keep_cls_row)
}

/// The kernels that compute the linear layers and the attention of heads of
/// `head_dim` dimensions on this machine, in words, for `segattn info`.
pub fn kernel_names(head_dim: usize) -> (String, String) {
    (MatmulKernel::best().to_string(), AttentionKernel::best(head_dim).to_string())
}

/// What computes a block of query rows.
#[derive(Clone, Copy, Debug, PartialEq)]
enum AttentionKernel {
    /// Two GEMMs per head around a softmax pass; any CPU, any head size.
    Gemm,
    /// Register tiles of six query rows, for 64 dimensions per head: scores,
    /// softmax and mixing stay in registers and L1.
    #[cfg(target_arch = "x86_64")]
    Tiles(Isa),
}

impl std::fmt::Display for AttentionKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Gemm => f.write_str("gemm crate around a softmax pass"),
            #[cfg(target_arch = "x86_64")]
            Self::Tiles(isa) => write!(f, "register tiles, {isa}"),
        }
    }
}

impl AttentionKernel {
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    fn best(head_dim: usize) -> Self {
        #[cfg(target_arch = "x86_64")]
        if let Some(isa) = simd::widest().filter(|_| head_dim == tile_attention::HEAD_DIM) {
            return Self::Tiles(isa);
        }
        Self::Gemm
    }

    /// Widths of the column panels of Kᵀ and of V that the kernel reads.
    fn panel_widths(self, tokens: usize, head_dim: usize) -> (usize, usize) {
        match self {
            Self::Gemm => (tokens, head_dim),
            #[cfg(target_arch = "x86_64")]
            Self::Tiles(isa) => (isa.lanes(), isa.lanes()),
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
        }
    }
}

fn attention_with(
    kernel: AttentionKernel,
    qkv: &Tensor,
    num_heads: usize,
    scale: f32,
    keep_cls_row: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let (batch, tokens, three_d) = qkv.dims3()?;
    let d = three_d / 3;
    let head_dim = d / num_heads;
    let mut cls_rows = vec![0f32; if keep_cls_row { batch * num_heads * tokens } else { 0 }];
    let mixed = cpu_slice(qkv, |data| {
        let mut out = Unwritten::new(batch * tokens * d);
        for (b, out) in out.slots().chunks_mut(tokens * d).enumerate() {
            let data = &data[b * tokens * three_d..(b + 1) * tokens * three_d];
            let heads = HeadMajor::new(data, tokens, num_heads, head_dim, kernel.panel_widths(tokens, head_dim));
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
        let out = unsafe { out.assume_written() };
        Ok(Tensor::from_vec(out, (batch, tokens, d), qkv.device())?)
    })?;
    let cls =
        keep_cls_row.then(|| Tensor::from_vec(cls_rows, (batch, num_heads, 1, tokens), qkv.device())).transpose()?;
    Ok((mixed, cls))
}

/// Keys and values copied out of the interleaved qkv rows once per layer, per
/// head: Kᵀ (head_dim, tokens) and V (tokens, head_dim), each in
/// [`panel_slot`]'s column panels, Kᵀ's zero past the last token. With one
/// panel as wide as the matrix, they are the plain row-major operands the
/// GEMM reads. Read in place, the keys form a column-major operand that the
/// GEMM re-gathers element by element for every block.
struct HeadMajor {
    keys_t: Vec<f32>,
    values: Vec<f32>,
    tokens: usize,
    num_heads: usize,
    head_dim: usize,
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

/// Query rows `first..` of all heads, written to `out` (rows x hidden), for
/// an attention kernel.
struct QueryBlock<'a> {
    qkv: &'a [f32],
    heads: &'a HeadMajor,
    out: &'a mut [MaybeUninit<f32>],
    first: usize,
    scale: f32,
    /// Return row 0's probabilities for every head.
    keep_first_row: bool,
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

    /// `gemm`, then `tiles` on every instruction set this CPU can run.
    #[cfg(target_arch = "x86_64")]
    fn usable<K>(gemm: K, tiles: fn(Isa) -> K) -> Vec<K> {
        std::iter::once(gemm).chain(simd::usable().map(tiles)).collect()
    }

    #[test]
    fn softmax_numerators_over_their_sums_match_the_exact_formula() {
        let tokens = 37;
        let mut scores: Vec<f32> = (0..3 * tokens).map(|i| ((i * 7919) % 97) as f32 * 0.3 - 10.0).collect();
        let expected: Vec<f32> = scores
            .chunks(tokens)
            .flat_map(|row| {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum: f32 = row.iter().map(|v| (v - max).exp()).sum();
                row.iter().map(move |v| (v - max).exp() / sum).collect::<Vec<_>>()
            })
            .collect();
        let mut inv_sums = [0f32; 3];
        softmax_numerators(&mut scores, tokens, &mut inv_sums);
        let ours = scores.chunks(tokens).zip(inv_sums).flat_map(|(row, inv)| row.iter().map(move |p| p * inv));
        for (a, b) in ours.zip(&expected) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    /// softmax(q kᵀ · scale) v per head, one value at a time.
    fn naive_attention(qkv: &[f32], tokens: usize, num_heads: usize, scale: f32) -> (Vec<f32>, Vec<f32>) {
        let d = qkv.len() / tokens / 3;
        let head_dim = d / num_heads;
        let at = |t: usize, part: usize, head: usize, c: usize| qkv[t * 3 * d + part * d + head * head_dim + c];
        let mut mixed = vec![0f32; tokens * d];
        let mut cls = Vec::new();
        for head in 0..num_heads {
            for t in 0..tokens {
                let scores: Vec<f32> = (0..tokens)
                    .map(|u| (0..head_dim).map(|c| at(t, 0, head, c) * at(u, 1, head, c)).sum::<f32>() * scale)
                    .collect();
                let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum: f32 = scores.iter().map(|s| (s - max).exp()).sum();
                let probs: Vec<f32> = scores.iter().map(|s| (s - max).exp() / sum).collect();
                for c in 0..head_dim {
                    mixed[t * d + head * head_dim + c] = (0..tokens).map(|u| probs[u] * at(u, 2, head, c)).sum();
                }
                if t == 0 {
                    cls.extend(probs);
                }
            }
        }
        (mixed, cls)
    }

    #[test]
    fn attention_kernels_match_the_formula() {
        let device = candle_core::Device::Cpu;
        // Heads of 64 dimensions, the size the tiles take. Token counts from
        // one to several key panels and row tiles, full and partial.
        for tokens in [1, 2, 5, 6, 7, 16, 17, 37, 97] {
            for num_heads in [1, 3] {
                let qkv = Tensor::randn(0f32, 1.0, (1, tokens, 3 * num_heads * 64), &device).unwrap();
                let data: Vec<f32> = qkv.flatten_all().unwrap().to_vec1().unwrap();
                let (expected_mixed, expected_cls) = naive_attention(&data, tokens, num_heads, 0.125);
                #[cfg(target_arch = "x86_64")]
                let kernels = usable(AttentionKernel::Gemm, AttentionKernel::Tiles);
                #[cfg(not(target_arch = "x86_64"))]
                let kernels = vec![AttentionKernel::Gemm];
                for kernel in kernels {
                    let (mixed, cls) = attention_with(kernel, &qkv, num_heads, 0.125, true).unwrap();
                    let mixed: Vec<f32> = mixed.flatten_all().unwrap().to_vec1().unwrap();
                    let cls: Vec<f32> = cls.unwrap().flatten_all().unwrap().to_vec1().unwrap();
                    for (ours, expected) in [(mixed, &expected_mixed), (cls, &expected_cls)] {
                        assert_eq!(ours.len(), expected.len());
                        for (a, e) in ours.iter().zip(expected) {
                            assert!((a - e).abs() < 1e-5, "{kernel:?}, {tokens} tokens, {num_heads} heads: {a} vs {e}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn residual_layer_norm_matches_the_formula() {
        let device = candle_core::Device::Cpu;
        // Widths below, at and past a vector; one row and many.
        for width in [1, 7, 16, 17, 64, 129] {
            for rows in [1, 3, 37] {
                for scaled in [false, true] {
                    let values = |seed: f32, n: usize| -> Vec<f32> {
                        (0..n).map(|i| (i as f32 * 0.37 + seed).sin() * 3.0).collect()
                    };
                    let x = values(0.1, rows * width);
                    let update = values(0.7, rows * width);
                    let (bias, gamma) = (values(1.3, width), values(2.9, width));
                    let (weight, shift) = (values(4.1, width), values(5.3, width));
                    let tensor = |v: &[f32]| Tensor::new(v, &device).unwrap();
                    let norm = Norm { weight: &tensor(&weight), bias: &tensor(&shift), eps: 1e-6 };
                    let x_t = Tensor::from_vec(x.clone(), (1, rows, width), &device).unwrap();
                    let gamma_t = tensor(&gamma);
                    let (sum, normed) =
                        residual_layer_norm(&x_t, update.clone(), &tensor(&bias), scaled.then_some(&gamma_t), &norm)
                            .unwrap();
                    let sum: Vec<f32> = sum.flatten_all().unwrap().to_vec1().unwrap();
                    let normed: Vec<f32> = normed.flatten_all().unwrap().to_vec1().unwrap();
                    for r in 0..rows {
                        let row: Vec<f32> = (0..width)
                            .map(|c| {
                                let i = r * width + c;
                                x[i] + if scaled { gamma[c] } else { 1.0 } * (update[i] + bias[c])
                            })
                            .collect();
                        let mean = row.iter().sum::<f32>() / width as f32;
                        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / width as f32;
                        for c in 0..width {
                            let expected_norm = (row[c] - mean) / (var + 1e-6).sqrt() * weight[c] + shift[c];
                            let (s, n) = (sum[r * width + c], normed[r * width + c]);
                            let at = format!("width {width}, {rows} rows, scaled {scaled}, ({r}, {c})");
                            assert!((s - row[c]).abs() < 1e-5, "{at}: sum {s} vs {}", row[c]);
                            assert!((n - expected_norm).abs() < 1e-4, "{at}: normed {n} vs {expected_norm}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn fused_gelu_matches_the_formulas() {
        let xs: Vec<f32> = (0..400).map(|i| (i as f32 - 200.0) * 0.05).collect();
        let bias = [0.25f32, -0.5];
        let x = Tensor::from_vec(xs.clone(), (200, 2), &candle_core::Device::Cpu).unwrap();
        let b = Tensor::new(&bias, &candle_core::Device::Cpu).unwrap();
        for exact in [true, false] {
            let mut ours = xs.clone();
            bias_gelu(&mut ours, &b, exact).unwrap();
            let shifted = x.broadcast_add(&b).unwrap();
            let reference = if exact { shifted.gelu_erf() } else { shifted.gelu() }.unwrap();
            let reference: Vec<f32> = reference.flatten_all().unwrap().to_vec1().unwrap();
            for (a, r) in ours.iter().zip(&reference) {
                assert!((a - r).abs() < 2e-5, "exact={exact}: {a} vs {r}");
            }
        }
    }

    #[test]
    fn matmul_kernels_match_candle() {
        let device = candle_core::Device::Cpu;
        // Rows around a row tile (6); outputs around a panel (8 or 16 lanes)
        // and a group of panels, full and partial; one input and many.
        for rows in [1, 5, 6, 7, 37] {
            for inputs in [1, 19, 64] {
                let x = Tensor::randn(0f32, 1.0, (1, rows, inputs), &device).unwrap();
                for outputs in [1, 8, 16, 17, 23, 83] {
                    let weight = Tensor::randn(0f32, 1.0, (outputs, inputs), &device).unwrap();
                    let expected = x.squeeze(0).unwrap().matmul(&weight.t().unwrap()).unwrap();
                    let expected: Vec<f32> = expected.flatten_all().unwrap().to_vec1().unwrap();
                    #[cfg(target_arch = "x86_64")]
                    let kernels = usable(MatmulKernel::Gemm, MatmulKernel::Tiles);
                    #[cfg(not(target_arch = "x86_64"))]
                    let kernels = vec![MatmulKernel::Gemm];
                    for kernel in kernels {
                        let ours = matmul(&x, &PackedWeight::for_kernel(&weight, kernel).unwrap()).unwrap();
                        assert_eq!(ours.len(), expected.len());
                        for (a, e) in ours.iter().zip(&expected) {
                            assert!((a - e).abs() < 1e-4, "{kernel:?}, {rows}x{inputs} by {outputs}: {a} vs {e}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn fast_exp_is_close_to_exp() {
        for i in 0..1740 {
            let x = -(i as f32) * 0.05;
            let (fast, exact) = (fast_exp(x), x.exp());
            // Relative error grows with |x| from rounding x·log2(e) in f32.
            assert!((fast - exact).abs() <= 5e-6 * exact, "{x}: {fast} vs {exact}");
        }
        assert_eq!(fast_exp(-1000.0), fast_exp(-87.0));
    }
}
