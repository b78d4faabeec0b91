//! x · W for the linear layers with register tiles, W packed once at load in
//! the panels the tiles read, so no call packs anything: the gemm crate packs
//! its operands in every task of every call.
//!
//! A tile is six rows of x by P panels of W, one vector wide each, P being
//! what fits the vector registers ([`Vector::TILE_PANELS`]).

use std::mem::MaybeUninit;

use rayon::prelude::*;

use crate::buffers::{LINE_BYTES, LineAligned, SharedOut, Unwritten};
use crate::matmul::Epilogue;
use crate::simd::{self, Bf16Pairs, Vector};

/// Rows of x per tile.
pub(crate) const TILE_ROWS: usize = 6;

/// `out` (rows x outputs) = `x` (rows x inputs) · W, then the epilogue, with
/// W in panels of (inputs, V::LANES), zero past the last output, and P
/// panels per tile. A bias is where the tiles' sums start, and a GELU is
/// taken in the registers as a tile stores them, so neither costs a pass.
///
/// # Safety
/// The CPU must have V's instruction set; `panels` must hold
/// ceil(outputs / V::LANES) panels of `inputs` rows.
pub(crate) unsafe fn product<V: Vector, const P: usize>(
    x: &[f32],
    inputs: usize,
    panels: &[f32],
    outputs: usize,
    epilogue: Epilogue,
    out: &mut [MaybeUninit<f32>],
    x_rows_in_cache: usize,
) {
    let rows = out.len() / outputs;
    let gelu = matches!(epilogue, Epilogue::BiasGelu(_));
    assert!(x.len() == rows * inputs && panels.len() == outputs.div_ceil(V::LANES) * inputs * V::LANES);
    let group = P * V::LANES;
    let groups = outputs.div_ceil(group);
    // Zero past the last output, as the panels are, so that every tile
    // loads whole vectors of it (a bias of another length fails the copy;
    // the table's `product` has checked it).
    let bias = epilogue.bias().map(|bias| {
        let mut padded = LineAligned::zeroed(groups * group);
        padded[..outputs].copy_from_slice(bias);
        padded
    });
    // Each task is a group of columns over a run of rows, so that the
    // group's panels stay in cache from tile to tile. A thread's tasks are
    // one range of them, a run of rows' groups one after another, so the
    // run's rows stay in cache from group to group. Each task is a job of
    // its own, which an idle thread can take: rayon would otherwise run the
    // quarters of the range it deals out whole, and where the host slowed
    // one core for a while the other sat idle for a tenth of the product.
    let runs = RowRuns::new(rows, groups, x_rows_in_cache, rayon::current_num_threads());
    let dst = SharedOut(out.as_mut_ptr().cast());
    (0..groups * runs.count).into_par_iter().with_max_len(1).for_each(|task| {
        let (index, run) = (task % groups, runs.rows(task / groups));
        let first_row = run.start;
        let block = Block {
            x: x[first_row * inputs..].as_ptr(),
            inputs,
            panels: panels[index * group * inputs..].as_ptr(),
            out: dst.at(first_row * outputs + index * group),
            outputs,
            columns: (outputs - index * group).min(group),
            bias: bias.as_ref().map(|bias| bias[index * group..].as_ptr()),
            gelu,
        };
        // SAFETY: V's instruction set by the caller's contract; the block's
        // rows and columns are inside x, panels and out, and no other task's.
        unsafe {
            V::enter(
                #[inline(always)]
                || block.run::<V, P>(run.len()),
            )
        };
    });
}

/// The runs of rows [`product`] cuts x into: enough for a run's rows of x
/// to stay in cache (`x_rows_in_cache`) and for four tasks (a run's group
/// of columns) a thread, then, where a few more runs make the tasks a
/// multiple of the threads, those, each starting on a tile. Runs that
/// differ by a tile at most give each thread the same work from the start:
/// rayon deals out a range of tasks in equal halves, and tasks then move
/// between threads only where the cores' speeds differ.
struct RowRuns {
    rows: usize,
    count: usize,
}

impl RowRuns {
    fn new(rows: usize, groups: usize, x_rows_in_cache: usize, threads: usize) -> Self {
        let tiles = rows.div_ceil(TILE_ROWS).max(1);
        let fewest = (4 * threads).div_ceil(groups).max(rows.div_ceil(x_rows_in_cache)).min(tiles);
        let count = (fewest..=tiles).find(|runs| (runs * groups).is_multiple_of(threads)).unwrap_or(fewest);
        Self { rows, count }
    }

    /// Run `run`'s rows, of `0..count`.
    fn rows(&self, run: usize) -> std::ops::Range<usize> {
        let start = |run: usize| match run {
            run if run == self.count => self.rows,
            run => run * self.rows / self.count / TILE_ROWS * TILE_ROWS,
        };
        start(run)..start(run + 1)
    }
}

/// [`product`] on bfloat16 pairs: x's rows converted to the pairs W's
/// panels are packed in, then the tiles over pairs of inputs.
///
/// # Safety
/// As [`product`], for [`Bf16Pairs`]: the CPU has AVX512-BF16 and `panels`
/// holds ceil(outputs / 16) panels of ceil(inputs / 2) rows of pairs.
pub(crate) unsafe fn bf16_product(
    x: &[f32],
    inputs: usize,
    panels: &[f32],
    outputs: usize,
    epilogue: Epilogue,
    out: &mut [MaybeUninit<f32>],
    x_rows_in_cache: usize,
) {
    // SAFETY: the caller's contract; `bf16_rows` lays out x in pairs.
    unsafe {
        let pairs = bf16_rows(x, inputs);
        product::<Bf16Pairs, { Bf16Pairs::TILE_PANELS }>(
            &pairs,
            inputs.div_ceil(2),
            panels,
            outputs,
            epilogue,
            out,
            x_rows_in_cache,
        )
    }
}

/// x's rows of `inputs` values as rows of bfloat16 pairs ([`Bf16Pairs`]).
///
/// # Safety
/// The CPU has AVX512-BF16.
pub(crate) unsafe fn bf16_rows(x: &[f32], inputs: usize) -> Vec<f32> {
    let slots = inputs.div_ceil(2);
    let mut pairs = Unwritten::new(x.len() / inputs * slots);
    pairs.slots().par_chunks_mut(64 * slots).zip(x.par_chunks(64 * inputs)).for_each(|(out, x)| {
        for (out, row) in out.chunks_exact_mut(slots).zip(x.chunks_exact(inputs)) {
            // SAFETY: the caller's contract; the row has `slots` slots.
            unsafe { simd::bf16_pairs(row, out) };
        }
    });
    // SAFETY: every row's slots were written.
    unsafe { pairs.assume_written() }
}

/// Up to P panels' columns of the product, over rows of x.
struct Block {
    x: *const f32,
    inputs: usize,
    panels: *const f32,
    out: *mut f32,
    outputs: usize,
    columns: usize,
    /// The block's P panels' lanes of the bias, zero past the last output.
    bias: Option<*const f32>,
    gelu: bool,
}

impl Block {
    /// # Safety
    /// V's instruction set; `rows` rows of x and out, and the block's
    /// panels, readable.
    #[inline(always)]
    unsafe fn run<V: Vector, const P: usize>(&self, rows: usize) {
        for first in (0..rows).step_by(TILE_ROWS) {
            self.prefetch_out(first + TILE_ROWS..(first + 2 * TILE_ROWS).min(rows));
            // SAFETY: the caller's contract.
            unsafe {
                match rows - first {
                    1 => self.tile::<V, 1, P>(first),
                    2 => self.tile::<V, 2, P>(first),
                    3 => self.tile::<V, 3, P>(first),
                    4 => self.tile::<V, 4, P>(first),
                    5 => self.tile::<V, 5, P>(first),
                    _ => self.tile::<V, TILE_ROWS, P>(first),
                }
            }
        }
    }

    /// Asks for the lines of out's `rows` in the block's columns. The output
    /// is new to the caches, and a tile whose stores go to lines still in
    /// memory waits for them, which shows most where tiles are short (few
    /// inputs); asked for while the tile before computes, they are in cache
    /// by then.
    #[inline(always)]
    fn prefetch_out(&self, rows: std::ops::Range<usize>) {
        const LINE: usize = LINE_BYTES / size_of::<f32>();
        for r in rows {
            let row = self.out.wrapping_add(r * self.outputs);
            for column in (0..self.columns).step_by(LINE).chain([self.columns - 1]) {
                simd::prefetch(row.wrapping_add(column));
            }
        }
    }

    /// out[R rows from `first`][the block's columns] = x · W.
    ///
    /// # Safety
    /// V's instruction set; R rows of x and out from `first`, and the
    /// block's panels, readable (out writable).
    #[inline(always)]
    unsafe fn tile<V: Vector, const R: usize, const P: usize>(&self, first: usize) {
        // SAFETY: the caller's contract.
        unsafe {
            if self.columns == P * V::LANES {
                self.panels::<V, R, P>(first, 0);
            } else {
                for panel in 0..self.columns.div_ceil(V::LANES) {
                    self.panels::<V, R, 1>(first, panel);
                }
            }
        }
    }

    /// out[R rows from `first`][P panels from `panel`] = x · W.
    ///
    /// # Safety
    /// As [`Block::tile`], for panels `panel..panel + P`.
    #[inline(always)]
    unsafe fn panels<V: Vector, const R: usize, const P: usize>(&self, first: usize, panel: usize) {
        // SAFETY: (all pointer reads and writes) the caller's contract.
        unsafe {
            let x = self.x.add(first * self.inputs);
            let panels = self.panels.add(panel * self.inputs * V::LANES);
            let start: [V; P] = match self.bias {
                // A bias as a product's sums, as every tile's accumulator holds them.
                Some(bias) => std::array::from_fn(|p| V::load(bias.add((panel + p) * V::LANES))),
                None => [V::zero(); P],
            };
            let acc = tile_product::<V, R, P>([start; R], (x, self.inputs), (panels, self.inputs), self.inputs);
            for p in 0..P {
                let column = (panel + p) * V::LANES;
                for (r, acc) in acc.iter().enumerate() {
                    let sums = if self.gelu { acc[p].gelu_of_sums() } else { acc[p] };
                    sums.store_first(self.out.add((first + r) * self.outputs + column), self.columns - column);
                }
            }
        }
    }
}

/// The microkernel of every tiled product, the attention's two included:
/// `acc` + Σ_k x[r][k] · B[k][panel p's V::LANES columns] for R rows of x,
/// `x_stride` apart, and P panels of `depth` rows of B in
/// `panel_slot`'s layout, `panel_rows` rows apart (a run of rows
/// of taller panels). R x P accumulators stay in registers.
///
/// # Safety
/// V's instruction set; R rows of `depth` values of x and P panels of B
/// readable.
#[inline(always)]
pub(crate) unsafe fn tile_product<V: Vector, const R: usize, const P: usize>(
    mut acc: [[V; P]; R],
    (x, x_stride): (*const f32, usize),
    (panels, panel_rows): (*const f32, usize),
    depth: usize,
) -> [[V; P]; R] {
    // SAFETY: (all pointer reads) the caller's contract.
    unsafe {
        // Four steps a turn: the rows' addresses, an integer instruction
        // or so per row, once per turn rather than per step, so the
        // front end keeps up with the FMAs.
        let mut k = 0;
        while k + 4 <= depth {
            for k in k..k + 4 {
                tile_step(&mut acc, (x, x_stride), (panels, panel_rows), k);
            }
            k += 4;
        }
        for k in k..depth {
            tile_step(&mut acc, (x, x_stride), (panels, panel_rows), k);
        }
        acc
    }
}

/// Step k of [`tile_product`].
///
/// # Safety
/// As [`tile_product`], for k below its depth.
#[inline(always)]
unsafe fn tile_step<V: Vector, const R: usize, const P: usize>(
    acc: &mut [[V; P]; R],
    (x, x_stride): (*const f32, usize),
    (panels, panel_rows): (*const f32, usize),
    k: usize,
) {
    // SAFETY: (all pointer reads) the caller's contract.
    unsafe {
        let mut b = [V::zero(); P];
        for (p, b) in b.iter_mut().enumerate() {
            *b = V::load(panels.add((p * panel_rows + k) * V::LANES));
        }
        for (r, acc) in acc.iter_mut().enumerate() {
            let xb = V::splat(*x.add(r * x_stride + k));
            for (acc, &b) in acc.iter_mut().zip(&b) {
                *acc = xb.mul_add(b, *acc);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_of_rows_share_out_evenly_and_stay_in_cache() {
        for rows in [1, 5, 6, 7, 13, 197, 785, 1201, 4801] {
            for groups in [1, 6, 18, 24] {
                for x_rows_in_cache in [1, 170, 682, 100_000] {
                    for threads in [1, 2, 3, 4, 16] {
                        let runs = RowRuns::new(rows, groups, x_rows_in_cache, threads);
                        let case =
                            format!("{rows} rows, {groups} groups, {x_rows_in_cache} in cache, {threads} threads");
                        let all: Vec<_> = (0..runs.count).map(|run| runs.rows(run)).collect();
                        assert_eq!((all[0].start, all[runs.count - 1].end), (0, rows), "{case}");
                        for (run, next) in all.iter().zip(&all[1..]) {
                            assert_eq!(run.end, next.start, "{case}");
                        }
                        for run in &all {
                            assert_eq!(run.start % TILE_ROWS, 0, "{case}: {run:?}");
                            let even = rows as f64 / runs.count as f64;
                            assert!((run.len() as f64 - even).abs() <= TILE_ROWS as f64, "{case}: {run:?}");
                            if x_rows_in_cache >= TILE_ROWS {
                                assert!(run.len() <= x_rows_in_cache + TILE_ROWS, "{case}: {run:?}");
                            }
                        }
                        if rows >= 197 && x_rows_in_cache >= 170 && threads <= 4 {
                            assert_eq!(runs.count * groups % threads, 0, "{case}: {} runs", runs.count);
                        }
                    }
                }
            }
        }
    }
}
