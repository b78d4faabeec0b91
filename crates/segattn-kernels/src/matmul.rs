//! `x · Wᵀ` for the linear layers, with W laid out once, when the model
//! loads, in the panels its kernel reads: register tiles on x86-64 with
//! AVX-512 or AVX2 + FMA, the gemm crate elsewhere.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use crate::ShapeError;
use crate::buffers::{SharedOut, Strided, Unwritten, overwrite_product};
#[cfg(target_arch = "x86_64")]
use crate::simd::{self, Avx2, Avx512, Isa, Vector, Width};
#[cfg(target_arch = "x86_64")]
use crate::tile_matmul;

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
pub(crate) enum MatmulKernel {
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
    pub(crate) fn best() -> Self {
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
    /// Packs W, `outputs` rows of `inputs` values, for the best kernel here.
    pub fn new(weight: &[f32], outputs: usize, inputs: usize) -> Result<Self, ShapeError> {
        if weight.len() != outputs * inputs {
            let shape = format!("{outputs} x {inputs}");
            return Err(ShapeError::new(format!("PackedWeight: {} values for a {shape} matrix", weight.len())));
        }
        Self::from_rows(outputs, inputs, |output, first, into| {
            into.copy_from_slice(&weight[output * inputs + first..][..into.len()]);
        })
    }

    /// Packs W, `outputs` rows of `inputs` values, that `read(output, first,
    /// into)` fills `into` with from: W[output][first..first + into.len()].
    /// W is read straight from wherever it is stored (a mapped file, in f16),
    /// converted and checked on the way, in the one pass the packing makes
    /// anyway. Each value is read once.
    pub fn from_rows(
        outputs: usize,
        inputs: usize,
        read: impl Fn(usize, usize, &mut [f32]) + Sync,
    ) -> Result<Self, ShapeError> {
        if inputs == 0 {
            return Err(ShapeError::new(format!("PackedWeight: a {outputs} x 0 matrix")));
        }
        Ok(Self::for_kernel(read, outputs, inputs, MatmulKernel::best()))
    }

    /// Each task lays out a piece of one panel: [`PIECE`] inputs of its
    /// outputs, read as runs of rows of W into a buffer that stays in L1,
    /// then written to the panel one input at a time.
    pub(crate) fn for_kernel(
        read: impl Fn(usize, usize, &mut [f32]) + Sync,
        outputs: usize,
        inputs: usize,
        kernel: MatmulKernel,
    ) -> Self {
        const PIECE: usize = 128;
        let width = kernel.panel_width(outputs).max(1);
        let mut panels = Unwritten::new(outputs.div_ceil(width) * inputs * width);
        panels.slots().par_chunks_mut(inputs * width).enumerate().for_each(|(panel, out)| {
            let lanes = width.min(outputs - panel * width);
            out.par_chunks_mut(PIECE * width).enumerate().for_each(|(piece, out)| {
                let (first, len) = (piece * PIECE, out.len() / width);
                let mut rows = vec![0.0; lanes * len];
                for (lane, row) in rows.chunks_exact_mut(len).enumerate() {
                    read(panel * width + lane, first, row);
                }
                for (k, out) in out.chunks_exact_mut(width).enumerate() {
                    for (lane, slot) in out.iter_mut().enumerate() {
                        slot.write(if lane < lanes { rows[lane * len + k] } else { 0.0 });
                    }
                }
            });
        });
        // SAFETY: each piece wrote every lane of each of its inputs.
        let panels = unsafe { panels.assume_written() };
        Self { panels, kernel, inputs, outputs }
    }

    pub fn outputs(&self) -> usize {
        self.outputs
    }
}

/// `x · Wᵀ` for `x`, rows of `inputs` values. The product goes into a fresh
/// buffer that the kernel writes once, never zeroed first.
pub fn matmul(x: &[f32], weight: &PackedWeight) -> Result<Vec<f32>, ShapeError> {
    let PackedWeight { inputs, outputs, .. } = *weight;
    {
        if inputs == 0 || !x.len().is_multiple_of(inputs) {
            return Err(ShapeError::new(format!("matmul: {} values are not rows of {inputs}", x.len())));
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
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matmul_kernels_match_the_formula() {
        // Rows around a row tile (6); outputs around a panel (8 or 16 lanes)
        // and a group of panels, full and partial; one input, many, and more
        // than one piece of the packing (128) with a partial last.
        for rows in [1, 5, 6, 7, 37] {
            for inputs in [1, 19, 64, 300] {
                let x = crate::noise(rows * inputs, (rows * 100 + inputs) as u64);
                for outputs in [1, 8, 16, 17, 23, 83] {
                    let weight = crate::noise(outputs * inputs, outputs as u64);
                    let expected: Vec<f32> = (0..rows * outputs)
                        .map(|i| {
                            (0..inputs).map(|k| x[i / outputs * inputs + k] * weight[i % outputs * inputs + k]).sum()
                        })
                        .collect();
                    #[cfg(target_arch = "x86_64")]
                    let kernels: Vec<MatmulKernel> =
                        std::iter::once(MatmulKernel::Gemm).chain(simd::usable().map(MatmulKernel::Tiles)).collect();
                    #[cfg(not(target_arch = "x86_64"))]
                    let kernels = vec![MatmulKernel::Gemm];
                    for kernel in kernels {
                        let read = |output: usize, first: usize, into: &mut [f32]| {
                            into.copy_from_slice(&weight[output * inputs + first..][..into.len()]);
                        };
                        let packed = PackedWeight::for_kernel(read, outputs, inputs, kernel);
                        let ours = matmul(&x, &packed).unwrap();
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
    fn shapes_that_do_not_fit_are_errors() {
        assert!(PackedWeight::new(&[0.0; 5], 2, 3).is_err());
        let weight = PackedWeight::new(&[1.0; 6], 2, 3).unwrap();
        assert!(matmul(&[1.0; 4], &weight).is_err());
        assert_eq!(matmul(&[1.0; 3], &weight).unwrap(), [3.0, 3.0]);
    }
}
