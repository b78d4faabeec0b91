//! `x · Wᵀ` for the linear layers, with W laid out once, when the model
//! loads, in the panels its kernel reads: register tiles on x86-64 with
//! AVX-512 or AVX2 + FMA, the gemm crate elsewhere; on request, bfloat16
//! tiles where the CPU has AVX512-BF16.

use std::mem::MaybeUninit;
use std::sync::Arc;

use rayon::prelude::*;

use crate::ShapeError;
use crate::buffers::{LineAligned, Unwritten};
use crate::caches::{Caches, caches};
use crate::dispatch::Kernels;
use crate::layout::{Precision, bf16_pair, transpose_rows};

/// A linear layer's W, (outputs, inputs) as stored, laid out once at load the
/// way its product reads it: Wᵀ (inputs, outputs) in `panel_slot`'s column
/// panels, zero past the last output. Read as stored, W would be packed by
/// the GEMM on every call.
#[derive(Clone)]
pub struct PackedWeight {
    /// The panels are `values[start..start + len]`: laid out here, or in
    /// memory someone else owns, such as a mapped file of panels laid out
    /// by an earlier run. Cloning shares them.
    values: Arc<dyn AsRef<[f32]> + Send + Sync>,
    start: usize,
    len: usize,
    kernels: &'static Kernels,
    inputs: usize,
    outputs: usize,
}

impl PackedWeight {
    /// Packs W, `outputs` rows of `inputs` values, for the best kernel here
    /// in `precision`, as [`PackedWeight::from_rows`].
    pub fn new(precision: Precision, weight: &[f32], outputs: usize, inputs: usize) -> Result<Self, ShapeError> {
        if weight.len() != outputs * inputs {
            let shape = format!("{outputs} x {inputs}");
            return Err(ShapeError::new(format!("PackedWeight: {} values for a {shape} matrix", weight.len())));
        }
        Self::from_rows(precision, outputs, inputs, |output, first, into| {
            into.copy_from_slice(&weight[output * inputs + first..][..into.len()]);
        })
    }

    /// Packs W, `outputs` rows of `inputs` values, that `read(output, first,
    /// into)` fills `into` with from: W[output][first..first + into.len()].
    /// W is read straight from wherever it is stored (a mapped file, in f16),
    /// converted and checked on the way, in the one pass the packing makes
    /// anyway. Each value is read once. In [`Precision::Bf16`] where it is
    /// available, else in f32 ([`PackedWeight::precision`] says which).
    pub fn from_rows(
        precision: Precision,
        outputs: usize,
        inputs: usize,
        read: impl Fn(usize, usize, &mut [f32]) + Sync,
    ) -> Result<Self, ShapeError> {
        if inputs == 0 {
            return Err(ShapeError::new(format!("PackedWeight: a {outputs} x 0 matrix")));
        }
        Ok(Self::for_kernels(read, outputs, inputs, Kernels::best(precision)))
    }

    /// Each task lays out a piece of one panel: [`PIECE`] of its rows
    /// (inputs, or pairs of them), read as runs of rows of W into a buffer
    /// that stays in L1, then written to the panel one row at a time.
    pub(crate) fn for_kernels(
        read: impl Fn(usize, usize, &mut [f32]) + Sync,
        outputs: usize,
        inputs: usize,
        kernels: &'static Kernels,
    ) -> Self {
        const PIECE: usize = 128;
        let width = kernels.panel_width(outputs);
        let per_slot = kernels.inputs_per_slot();
        let depth = inputs.div_ceil(per_slot);
        let mut panels = LineAligned::unwritten(outputs.div_ceil(width) * depth * width);
        panels.slots().par_chunks_mut(depth * width).enumerate().for_each(|(panel, out)| {
            let lanes = width.min(outputs - panel * width);
            out.par_chunks_mut(PIECE * width).enumerate().for_each(|(piece, out)| {
                let first = piece * PIECE * per_slot;
                let len = (out.len() / width * per_slot).min(inputs - first);
                // Rows past the last output stay zero, as the panel's lanes do.
                let mut rows = vec![0.0; width * len];
                for (lane, row) in rows.chunks_exact_mut(len).take(lanes).enumerate() {
                    read(panel * width + lane, first, row);
                }
                let depth = out.len() / width;
                let rows = match kernels.precision {
                    Precision::F32 => rows,
                    Precision::Bf16 => {
                        let mut pairs = Vec::with_capacity(width * depth);
                        for row in rows.chunks_exact(len) {
                            let mut halves = row.chunks_exact(2);
                            pairs.extend(halves.by_ref().map(|pair| bf16_pair(pair[0], pair[1])));
                            pairs.extend(halves.remainder().iter().map(|&last| bf16_pair(last, 0.0)));
                        }
                        pairs
                    }
                };
                transpose(&rows, depth, width, out);
            });
        });
        // SAFETY: each piece wrote every lane of each of its rows.
        let panels = unsafe { panels.assume_written() };
        let len = panels.len();
        Self { values: Arc::new(panels), start: 0, len, kernels, inputs, outputs }
    }

    /// What the product multiplies in.
    pub fn precision(&self) -> Precision {
        self.kernels.precision
    }

    /// The panels as laid out, to be stored and given back to
    /// [`PackedWeight::from_panels`] by a later run on this machine.
    pub fn panels(&self) -> &[f32] {
        &(*self.values).as_ref()[self.start..self.start + self.len]
    }

    /// Names the layout of [`PackedWeight::panels`]: the kernel it is for.
    pub fn layout_name(&self) -> String {
        self.kernels.matmul_name.to_string()
    }

    /// A W of `outputs` x `inputs` whose panels, laid out by an earlier
    /// [`PackedWeight::from_rows`] in `precision` for the layout named
    /// `layout_name`, are `owner`'s values `start..start + len`. An error
    /// unless that is the layout this machine's kernel reads now (a file
    /// written on another CPU, or under another limit, is not) and the
    /// length is that layout's.
    pub fn from_panels(
        precision: Precision,
        outputs: usize,
        inputs: usize,
        layout_name: &str,
        owner: Arc<dyn AsRef<[f32]> + Send + Sync>,
        start: usize,
    ) -> Result<Self, ShapeError> {
        let kernels = Kernels::best(precision);
        if layout_name != kernels.matmul_name {
            let expected = kernels.matmul_name;
            return Err(ShapeError::new(format!("PackedWeight: panels for {layout_name}, not {expected}")));
        }
        let width = kernels.panel_width(outputs);
        // The sizes come from a file: a product or end past usize is a
        // layout no file can hold, not an overflow.
        let len = (outputs.div_ceil(width))
            .checked_mul(inputs.div_ceil(kernels.inputs_per_slot()))
            .and_then(|slots| slots.checked_mul(width));
        let end = len.and_then(|len| start.checked_add(len));
        match (len, end) {
            (Some(len), Some(end)) if inputs > 0 && outputs > 0 && end <= (*owner).as_ref().len() => {
                Ok(Self { values: owner, start, len, kernels, inputs, outputs })
            }
            _ => Err(ShapeError::new(format!("PackedWeight: no panels at {start} for {outputs} x {inputs}"))),
        }
    }

    pub fn outputs(&self) -> usize {
        self.outputs
    }

    /// (outputs, inputs): W's shape.
    pub fn shape(&self) -> (usize, usize) {
        (self.outputs, self.inputs)
    }
}

/// What a product does to its sums as it makes them: adds a bias (one
/// value per output), then takes the GELU (the erf form), or not. Done
/// there, neither costs a pass over the product.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Epilogue<'a> {
    Nothing,
    Bias(&'a [f32]),
    BiasGelu(&'a [f32]),
}

impl<'a> Epilogue<'a> {
    pub(crate) fn bias(self) -> Option<&'a [f32]> {
        match self {
            Epilogue::Nothing => None,
            Epilogue::Bias(bias) | Epilogue::BiasGelu(bias) => Some(bias),
        }
    }
}

/// `x · Wᵀ` for `x`, rows of `inputs` values. The product goes into a fresh
/// buffer that the kernel writes once, never zeroed first.
pub fn matmul(x: &[f32], weight: &PackedWeight) -> Result<Vec<f32>, ShapeError> {
    matmul_blocked(x, weight, Epilogue::Nothing, &caches())
}

/// `x · Wᵀ + bias`, a linear layer, with `bias` (one value per output)
/// added as the product is made, not in a pass over it after.
pub fn linear(x: &[f32], weight: &PackedWeight, bias: &[f32]) -> Result<Vec<f32>, ShapeError> {
    matmul_blocked(x, weight, Epilogue::Bias(bias), &caches())
}

/// GELU(x · Wᵀ + bias) in the erf form, the first layer of a transformer's
/// MLP: [`linear`] with the GELU taken as the product stores its sums (on
/// the gemm crate's kernels, in a pass after).
pub fn linear_gelu(x: &[f32], weight: &PackedWeight, bias: &[f32]) -> Result<Vec<f32>, ShapeError> {
    matmul_blocked(x, weight, Epilogue::BiasGelu(bias), &caches())
}

/// [`matmul`], [`linear`] or [`linear_gelu`], blocked for `caches`.
fn matmul_blocked(
    x: &[f32],
    weight: &PackedWeight,
    epilogue: Epilogue,
    caches: &Caches,
) -> Result<Vec<f32>, ShapeError> {
    let PackedWeight { inputs, outputs, .. } = *weight;
    if inputs == 0 || !x.len().is_multiple_of(inputs) {
        return Err(ShapeError::new(format!("matmul: {} values are not rows of {inputs}", x.len())));
    }
    if let Some(len) = epilogue.bias().map(<[f32]>::len).filter(|&len| len != outputs) {
        return Err(ShapeError::new(format!("linear: a bias of {len} values for {outputs} outputs")));
    }
    let rows = x.len() / inputs;
    let mut product = Unwritten::new(rows * outputs);
    weight.kernels.product(x, inputs, weight.panels(), outputs, epilogue, product.slots(), caches);
    // SAFETY: every kernel writes every value of the product when inputs > 0.
    Ok(unsafe { product.assume_written() })
}

/// `out` (depth rows of `width`) = the transpose of `rows` (width rows of
/// `depth`). The panel widths the tiles use are constants to the compiler,
/// so their loops unroll without a branch per value.
fn transpose(rows: &[f32], depth: usize, width: usize, out: &mut [MaybeUninit<f32>]) {
    fn fixed<const W: usize>(rows: &[f32], depth: usize, out: &mut [MaybeUninit<f32>]) {
        transpose_rows::<W>(std::array::from_fn(|lane| &rows[lane * depth..][..depth]), out);
    }
    match width {
        16 => fixed::<16>(rows, depth, out),
        8 => fixed::<8>(rows, depth, out),
        _ => {
            for (k, out) in out.chunks_exact_mut(width).enumerate() {
                for (lane, slot) in out.iter_mut().enumerate() {
                    slot.write(rows[lane * depth + k]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::bf16_rounded;

    #[test]
    fn matmul_kernels_match_the_formula() {
        // Rows around a row tile (6); outputs around a panel (8 or 16 lanes)
        // and a group of panels, full and partial; one input, an odd number
        // (a bfloat16 pair half empty), many, and more than one piece of the
        // packing (128 rows) with a partial last.
        for rows in [1, 5, 6, 7, 37] {
            for inputs in [1, 19, 64, 300] {
                let x = crate::noise(rows * inputs, (rows * 100 + inputs) as u64);
                for outputs in [1, 8, 16, 17, 23, 83] {
                    let weight = crate::noise(outputs * inputs, outputs as u64);
                    for kernels in Kernels::all_here() {
                        // bfloat16 multiplies x and W rounded; its sums are f32.
                        let rounded = |v: &[f32]| -> Vec<f32> {
                            match kernels.precision {
                                Precision::F32 => v.to_vec(),
                                Precision::Bf16 => v.iter().map(|&v| bf16_rounded(v)).collect(),
                            }
                        };
                        let (xr, wr) = (rounded(&x), rounded(&weight));
                        let expected: Vec<f64> = (0..rows * outputs)
                            .map(|i| {
                                let (row, output) = (i / outputs, i % outputs);
                                (0..inputs)
                                    .map(|k| f64::from(xr[row * inputs + k]) * f64::from(wr[output * inputs + k]))
                                    .sum()
                            })
                            .collect();
                        let read = |output: usize, first: usize, into: &mut [f32]| {
                            into.copy_from_slice(&weight[output * inputs + first..][..into.len()]);
                        };
                        let packed = PackedWeight::for_kernels(read, outputs, inputs, kernels);
                        assert_eq!(packed.panels().as_ptr() as usize % 64, 0, "{kernels:?}: panels off a line");
                        // With a bias too (where the sums start), and a GELU
                        // of the biased sums (as the tiles store them).
                        let bias = crate::noise(outputs, 11);
                        for caches in crate::caches::for_tests() {
                            for epilogue in [Epilogue::Nothing, Epilogue::Bias(&bias), Epilogue::BiasGelu(&bias)] {
                                let ours = matmul_blocked(&x, &packed, epilogue, &caches).unwrap();
                                assert_eq!(ours.len(), expected.len());
                                for (i, (a, e)) in ours.iter().zip(&expected).enumerate() {
                                    let e = e + epilogue.bias().map_or(0.0, |bias| f64::from(bias[i % outputs]));
                                    let e = match epilogue {
                                        Epilogue::BiasGelu(_) => f64::from(crate::rows::gelu(e as f32, true)),
                                        _ => e,
                                    };
                                    assert!(
                                        (f64::from(*a) - e).abs() < 1e-4,
                                        "{kernels:?}, {caches:?}, {rows}x{inputs} by {outputs}, {epilogue:?}: {a} vs {e}",
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn rows_of_x_become_the_pairs_the_weights_are_packed_in() {
        if crate::simd::bf16().is_none() {
            return;
        }
        for inputs in [1, 2, 15, 16, 17, 33, 300] {
            let mut x = crate::noise(3 * inputs, inputs as u64);
            x[0] = 1.0 + 1.0 / 256.0;
            // SAFETY: the CPU has AVX512-BF16, checked above.
            let pairs = unsafe { crate::tile_matmul::bf16_rows(&x, inputs) };
            let slots = inputs.div_ceil(2);
            assert_eq!(pairs.len(), 3 * slots);
            for (row, pairs) in x.chunks(inputs).zip(pairs.chunks(slots)) {
                for (k, pair) in pairs.iter().enumerate() {
                    let high = row.get(2 * k + 1).copied().unwrap_or(0.0);
                    assert_eq!(pair.to_bits(), bf16_pair(row[2 * k], high).to_bits(), "{inputs}: slot {k}");
                }
            }
        }
    }

    #[test]
    fn panels_given_back_multiply_as_they_did() {
        let (outputs, inputs) = (23, 19);
        let weight = crate::noise(outputs * inputs, 3);
        let x = crate::noise(7 * inputs, 4);
        for precision in [Precision::F32, Precision::Bf16] {
            let packed = PackedWeight::new(precision, &weight, outputs, inputs).unwrap();
            let stored: Vec<f32> = [&[9.0; 5][..], packed.panels()].concat();
            let owner: Arc<Vec<f32>> = Arc::new(stored);
            let name = packed.layout_name();
            let given_back = PackedWeight::from_panels(precision, outputs, inputs, &name, owner.clone(), 5).unwrap();
            assert_eq!(matmul(&x, &given_back).unwrap(), matmul(&x, &packed).unwrap());
            // Another layout, or too few values, is refused.
            assert!(PackedWeight::from_panels(precision, outputs, inputs, "other", owner.clone(), 5).is_err());
            assert!(PackedWeight::from_panels(precision, outputs, inputs, &name, owner.clone(), 6).is_err());
            // Sizes read from a file may be anything: past usize, or no
            // outputs at all (found by fuzzing: a division by zero), is refused.
            for (outputs, inputs, start) in [(outputs, inputs, usize::MAX), (usize::MAX, usize::MAX, 0), (0, inputs, 5)]
            {
                assert!(PackedWeight::from_panels(precision, outputs, inputs, &name, owner.clone(), start).is_err());
            }
        }
    }

    #[test]
    fn shapes_that_do_not_fit_are_errors() {
        assert!(PackedWeight::new(Precision::F32, &[0.0; 5], 2, 3).is_err());
        let weight = PackedWeight::new(Precision::F32, &[1.0; 6], 2, 3).unwrap();
        assert!(matmul(&[1.0; 4], &weight).is_err());
        assert!(linear(&[1.0; 3], &weight, &[1.0; 3]).is_err());
        assert_eq!(linear(&[1.0; 3], &weight, &[0.5, -1.0]).unwrap(), [3.5, 2.0]);
        assert!(linear_gelu(&[1.0; 3], &weight, &[1.0; 3]).is_err());
        assert_eq!(matmul(&[1.0; 3], &weight).unwrap(), [3.0, 3.0]);
    }
}
