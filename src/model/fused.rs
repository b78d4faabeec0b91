//! The candle side of the `segattn-kernels` crate: tensors in and out of its
//! slice kernels, and `SEGATTN_KERNELS`, read once, as its instruction-set
//! limit.

use std::sync::Once;

use anyhow::{Context, Result, bail};
use candle_core::{Storage, Tensor};
use rayon::prelude::*;
use segattn_kernels as kernels;

pub use kernels::{KeepAwake, Norm, PackedWeight, Precision};

/// Applies SEGATTN_KERNELS (`avx2`, or `portable` for the gemm crate's
/// path) before any kernel runs, so that CI can test every path on one
/// machine.
fn limit_kernels() {
    static APPLIED: Once = Once::new();
    APPLIED.call_once(|| {
        let limit = match std::env::var("SEGATTN_KERNELS").as_deref() {
            Ok("portable") => kernels::Limit::Portable,
            Ok("avx2") => kernels::Limit::Avx2,
            _ => kernels::Limit::Widest,
        };
        kernels::set_limit(limit);
    });
}

/// Whether this machine (under SEGATTN_KERNELS) multiplies in `precision`.
pub fn is_available(precision: Precision) -> bool {
    limit_kernels();
    precision.is_available()
}

/// Why this machine (under SEGATTN_KERNELS) multiplies in f32 instead of
/// `precision`, in words; `None` where it multiplies in `precision`.
pub fn unavailable_because(precision: Precision) -> Option<&'static str> {
    limit_kernels();
    precision.unavailable_because()
}

/// W, `outputs` x `inputs`, laid out for the kernel that will read it in
/// `precision` (f32 where that is not available), from
/// `read(output, first, into)`, which fills `into` with W[output][first..].
pub fn pack_rows(
    precision: Precision,
    outputs: usize,
    inputs: usize,
    read: impl Fn(usize, usize, &mut [f32]) + Sync,
) -> Result<PackedWeight> {
    limit_kernels();
    Ok(PackedWeight::from_rows(precision, outputs, inputs, read)?)
}

/// `x · Wᵀ` for `x` (…, inputs), as a fresh buffer: candle's matmul zeroes
/// its output first, in a serial pass that leaves the other cores idle.
pub fn matmul(x: &Tensor, weight: &PackedWeight) -> Result<Vec<f32>> {
    limit_kernels();
    cpu_slice(x, |x| Ok(kernels::matmul(x, weight)?))
}

/// GELU(x + bias) over the rows of `values`, in place: the exact (erf) form,
/// or the tanh approximation.
pub fn bias_gelu(values: &mut [f32], bias: &[f32], exact: bool) {
    limit_kernels();
    kernels::bias_gelu(values, bias, exact);
}

/// `x · Wᵀ + bias` for `x` (…, inputs), as [`matmul`] makes it, the bias
/// where the product's sums start.
pub fn linear(x: &Tensor, weight: &PackedWeight, bias: &[f32]) -> Result<Vec<f32>> {
    limit_kernels();
    cpu_slice(x, |x| Ok(kernels::linear(x, weight, bias)?))
}

/// GELU(`x · Wᵀ + bias`) in the erf form for `x` (…, inputs): [`linear`]
/// with the GELU taken as the product stores its sums.
pub fn linear_gelu(x: &Tensor, weight: &PackedWeight, bias: &[f32]) -> Result<Vec<f32>> {
    limit_kernels();
    cpu_slice(x, |x| Ok(kernels::linear_gelu(x, weight, bias)?))
}

/// The non-overlapping q x q patches of `x` (B, H, W, C), of any strides,
/// as rows (B, (H/q)·(W/q), C·q·q) of each patch's values in (channel, row,
/// column) order: a stride-q convolution's inputs, for one product. A row
/// of patches a task, each run of q values along W copied as a slice where
/// W is contiguous (planar pixels), where candle's strided copy walks an
/// index per run.
pub fn patches(x: &Tensor, q: usize) -> Result<Tensor> {
    let (batch, height, width, channels) = x.dims4()?;
    let (rows, cols) = (height / q, width / q);
    let (storage, layout) = x.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else { bail!("patches are gathered on the CPU only") };
    let (values, start) = (cpu.as_slice::<f32>()?, layout.start_offset());
    let &[sb, sh, sw, sc] = layout.stride() else { bail!("patches of a tensor of {} dimensions", layout.dims().len()) };
    let row_len = channels * q * q;
    let mut out = vec![0f32; batch * rows * cols * row_len];
    out.par_chunks_mut(cols * row_len).enumerate().for_each(|(band, out)| {
        let (b, i) = (band / rows, band % rows);
        for (j, patch) in out.chunks_exact_mut(row_len).enumerate() {
            for (run, out) in patch.chunks_exact_mut(q).enumerate() {
                let (c, r) = (run / q, run % q);
                let first = start + b * sb + (i * q + r) * sh + j * q * sw + c * sc;
                if sw == 1 {
                    out.copy_from_slice(&values[first..first + q]);
                } else {
                    out.iter_mut().enumerate().for_each(|(k, v)| *v = values[first + k * sw]);
                }
            }
        }
    });
    Ok(Tensor::from_vec(out, (batch, rows * cols, row_len), x.device())?)
}

/// LayerNorm over the last dimension.
pub fn layer_norm(x: &Tensor, norm: Norm) -> Result<Tensor> {
    limit_kernels();
    let normed = cpu_slice(x, |x| Ok(kernels::layer_norm(x, norm)?))?;
    Ok(Tensor::from_vec(normed, x.shape(), x.device())?)
}

/// The residual update `x + γ·(update + bias)` (γ: the layer scale, if any)
/// and the LayerNorm that reads it next, in one pass. `update` is `x`'s
/// shape and becomes the new `x`; returns it and its normalized copy.
pub fn residual_layer_norm(
    x: &Tensor,
    mut update: Vec<f32>,
    bias: &[f32],
    gamma: Option<&[f32]>,
    norm: Norm,
) -> Result<(Tensor, Tensor)> {
    limit_kernels();
    let normed = cpu_slice(x, |x| Ok(kernels::residual_layer_norm(x, &mut update, bias, gamma, norm)?))?;
    Ok((Tensor::from_vec(update, x.shape(), x.device())?, Tensor::from_vec(normed, x.shape(), x.device())?))
}

/// Attention over `qkv` of shape (B, tokens, 3·hidden) laid out as
/// (token, [q|k|v], head, head_dim), its products in `precision` where
/// that is available. Returns the mixed values (B, tokens, hidden) and, when
/// `keep_cls_row`, the class token's attention (B, heads, 1, tokens).
pub fn attention(
    qkv: &Tensor,
    num_heads: usize,
    scale: f32,
    keep_cls_row: bool,
    precision: Precision,
) -> Result<(Tensor, Option<Tensor>)> {
    limit_kernels();
    let (batch, tokens, three_d) = qkv.dims3()?;
    let attended =
        cpu_slice(qkv, |qkv| Ok(kernels::attention(qkv, (batch, tokens), num_heads, scale, keep_cls_row, precision)?))?;
    let mixed = Tensor::from_vec(attended.mixed, (batch, tokens, three_d / 3), qkv.device())?;
    let shape = (batch, num_heads, 1, tokens);
    let cls = attended.cls_rows.map(|rows| Tensor::from_vec(rows, shape, qkv.device())).transpose()?;
    Ok((mixed, cls))
}

/// The kernels that compute the linear layers and the attention of heads of
/// `head_dim` dimensions on this machine, in words, for `segattn info`.
pub fn kernel_names(precision: Precision, head_dim: usize) -> (String, String) {
    limit_kernels();
    kernels::kernel_names(precision, head_dim)
}

fn cpu_slice<T>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<T>) -> Result<T> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else { bail!("fused kernels run on the CPU only") };
    let (start, end) = layout.contiguous_offsets().context("fused kernels need contiguous tensors")?;
    f(&cpu.as_slice::<f32>()?[start..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patches_are_the_reshaped_permuted_tensor() {
        let device = candle_core::Device::Cpu;
        let (batch, channels, height, width, q) = (2, 3, 9, 13, 4);
        let values: Vec<f32> = (0..batch * channels * height * width).map(|i| i as f32).collect();
        let planar = Tensor::from_vec(values, (batch, channels, height, width), &device).unwrap();
        // Trailing pixels cut off (a view with an offset and strides), then
        // channels last: planar pixels as the patch embedding sees them, and
        // the same values stored channels last, as a stem leaves them.
        let (rows, cols) = (height / q, width / q);
        let view =
            planar.narrow(2, 1, rows * q).unwrap().narrow(3, 0, cols * q).unwrap().permute((0, 2, 3, 1)).unwrap();
        for x in [view.clone(), view.contiguous().unwrap()] {
            let expected = x
                .reshape((batch, rows, q, cols, q, channels))
                .unwrap()
                .permute((0, 1, 3, 5, 2, 4))
                .unwrap()
                .contiguous()
                .unwrap()
                .reshape((batch, rows * cols, channels * q * q))
                .unwrap();
            let ours = patches(&x, q).unwrap();
            assert_eq!(ours.dims(), expected.dims());
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(flat(&ours), flat(&expected), "strides {:?}", x.layout().stride());
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
            bias_gelu(&mut ours, &bias, exact);
            let shifted = x.broadcast_add(&b).unwrap();
            let reference = if exact { shifted.gelu_erf() } else { shifted.gelu() }.unwrap();
            let reference: Vec<f32> = reference.flatten_all().unwrap().to_vec1().unwrap();
            for (a, r) in ours.iter().zip(&reference) {
                assert!((a - r).abs() < 2e-5, "exact={exact}: {a} vs {r}");
            }
        }
        // As the first layer of an MLP: x (200 x 2) · Wᵀ (2 x 3) + bias.
        let w = [0.5f32, -1.0, 2.0, 0.25, -0.75, 1.5];
        let packed = PackedWeight::new(Precision::F32, &w, 3, 2).unwrap();
        let ours = linear_gelu(&x, &packed, &[0.1, -0.2, 0.3]).unwrap();
        let w = Tensor::from_vec(w.to_vec(), (3, 2), &candle_core::Device::Cpu).unwrap();
        let b = Tensor::new(&[0.1f32, -0.2, 0.3], &candle_core::Device::Cpu).unwrap();
        let reference = x.matmul(&w.t().unwrap()).unwrap().broadcast_add(&b).unwrap().gelu_erf().unwrap();
        let reference: Vec<f32> = reference.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(ours.len(), reference.len());
        for (a, r) in ours.iter().zip(&reference) {
            assert!((a - r).abs() < 2e-5, "linear_gelu: {a} vs {r}");
        }
    }
}
