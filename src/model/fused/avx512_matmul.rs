//! x · W for the linear layers with AVX-512 register tiles, W packed once at
//! load in the panels the tiles read, so no call packs anything: the gemm
//! crate packs its operands in every task of every call (1.4 % of samples).
//! ViT-S/16 went from 411–455 to 407–415 ms at 480x640 and from 53–62 to
//! 49–52 ms at 224x224 (3 interleaved pairs each).

use std::arch::x86_64::*;
use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::SharedOut;

/// Output columns per panel of the packed W: one vector.
pub(super) const PANEL: usize = 16;
/// Rows of x per tile.
const TILE_ROWS: usize = 6;
/// Panels per tile: 6 x 4 accumulators, four panel vectors and a broadcast
/// in the 32 vector registers.
const GROUP: usize = 4;

pub(super) fn available() -> bool {
    super::avx512_enabled()
}

/// `out` (rows x outputs) = `x` (rows x inputs) · W, with W in
/// [`PANEL`]-wide panels of (inputs, PANEL), zero past the last output.
///
/// # Safety
/// The CPU must have AVX-512F ([`available`]); `panels` must hold
/// ceil(outputs / PANEL) panels of `inputs` rows.
pub(super) unsafe fn product(x: &[f32], inputs: usize, panels: &[f32], outputs: usize, out: &mut [MaybeUninit<f32>]) {
    let rows = out.len() / outputs;
    assert!(x.len() == rows * inputs && panels.len() == outputs.div_ceil(PANEL) * inputs * PANEL);
    let groups = outputs.div_ceil(GROUP * PANEL);
    // Enough tasks to share out evenly, each a group of columns over a run
    // of rows, so that the group's panels stay in L2 from tile to tile.
    let splits = (4 * rayon::current_num_threads()).div_ceil(groups);
    let chunk = rows.div_ceil(splits).next_multiple_of(TILE_ROWS);
    let dst = SharedOut(out.as_mut_ptr().cast());
    (0..groups * rows.div_ceil(chunk)).into_par_iter().for_each(|task| {
        let (group, first_row) = (task % groups, task / groups * chunk);
        let block = Block {
            x: x[first_row * inputs..].as_ptr(),
            inputs,
            panels: panels[group * GROUP * inputs * PANEL..].as_ptr(),
            out: dst.at(first_row * outputs + group * GROUP * PANEL),
            outputs,
            columns: (outputs - group * GROUP * PANEL).min(GROUP * PANEL),
        };
        // SAFETY: AVX-512F by the caller's contract; the block's rows and
        // columns are inside x, panels and out, and no other task's.
        unsafe { block.run(chunk.min(rows - first_row)) };
    });
}

/// Up to [`GROUP`] panels' columns of the product, over rows of x.
struct Block {
    x: *const f32,
    inputs: usize,
    panels: *const f32,
    out: *mut f32,
    outputs: usize,
    columns: usize,
}

impl Block {
    /// # Safety
    /// AVX-512F; `rows` rows of x and out, and the block's panels, readable.
    #[target_feature(enable = "avx512f")]
    unsafe fn run(&self, rows: usize) {
        for first in (0..rows).step_by(TILE_ROWS) {
            // SAFETY: the caller's contract.
            unsafe {
                match rows - first {
                    1 => self.tile::<1>(first),
                    2 => self.tile::<2>(first),
                    3 => self.tile::<3>(first),
                    4 => self.tile::<4>(first),
                    5 => self.tile::<5>(first),
                    _ => self.tile::<TILE_ROWS>(first),
                }
            }
        }
    }

    #[inline(always)]
    unsafe fn tile<const R: usize>(&self, first: usize) {
        // SAFETY: the caller's contract.
        unsafe {
            if self.columns == GROUP * PANEL {
                self.panels::<R, GROUP>(first, 0);
            } else {
                for panel in 0..self.columns.div_ceil(PANEL) {
                    self.panels::<R, 1>(first, panel);
                }
            }
        }
    }

    /// out[R rows from `first`][P panels from `panel`] = x · W.
    #[inline(always)]
    unsafe fn panels<const R: usize, const P: usize>(&self, first: usize, panel: usize) {
        // SAFETY: (all pointer reads and writes) the caller's contract.
        unsafe {
            let x = self.x.add(first * self.inputs);
            let acc = tile_product::<R, P>(x, self.inputs, self.panels.add(panel * self.inputs * PANEL), self.inputs);
            for p in 0..P {
                let column = (panel + p) * PANEL;
                let mask: __mmask16 =
                    if self.columns - column >= PANEL { !0 } else { (1 << (self.columns - column)) - 1 };
                for (r, acc) in acc.iter().enumerate() {
                    _mm512_mask_storeu_ps(self.out.add((first + r) * self.outputs + column), mask, acc[p]);
                }
            }
        }
    }
}

/// The microkernel of every AVX-512 product, the attention's two included:
/// Σ_k x[r][k] · B[k][panel p's 16 columns] for R rows of x, `x_stride`
/// apart, and P panels of a `depth`-row B in [`super::panel_slot`]'s layout.
/// R x P accumulators stay in registers.
///
/// # Safety
/// AVX-512F; R rows of `depth` values of x and P panels of B readable.
#[inline(always)]
pub(super) unsafe fn tile_product<const R: usize, const P: usize>(
    x: *const f32,
    x_stride: usize,
    panels: *const f32,
    depth: usize,
) -> [[__m512; P]; R] {
    // SAFETY: (all pointer reads) the caller's contract.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); P]; R];
        for k in 0..depth {
            let mut b = [_mm512_setzero_ps(); P];
            for (p, b) in b.iter_mut().enumerate() {
                *b = _mm512_loadu_ps(panels.add((p * depth + k) * PANEL));
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let xb = _mm512_set1_ps(*x.add(r * x_stride + k));
                for (acc, &b) in acc.iter_mut().zip(&b) {
                    *acc = _mm512_fmadd_ps(xb, b, *acc);
                }
            }
        }
        acc
    }
}
