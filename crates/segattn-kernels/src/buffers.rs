//! Buffers the kernels write without zeroing first, an output shared by
//! tasks that write disjoint parts, the gemm crate called single-threaded on
//! strided operands, and the panel layout of every tiled product.

use std::mem::MaybeUninit;

use gemm::{Parallelism, gemm};

/// A buffer of `len` values that is written whole before anything reads it,
/// so it is never zeroed first. Its slots are exactly `len` long, even where
/// the allocation holds more.
pub(crate) struct Unwritten {
    buffer: Vec<f32>,
    len: usize,
}

impl Unwritten {
    pub(crate) fn new(len: usize) -> Self {
        Self { buffer: Vec::with_capacity(len), len }
    }

    pub(crate) fn slots(&mut self) -> &mut [MaybeUninit<f32>] {
        &mut self.buffer.spare_capacity_mut()[..self.len]
    }

    /// # Safety
    /// Every one of the `len` slots has been written.
    pub(crate) unsafe fn assume_written(mut self) -> Vec<f32> {
        // SAFETY: the caller's contract; the capacity is at least `len`.
        unsafe { self.buffer.set_len(self.len) };
        self.buffer
    }
}

/// A row-major matrix operand as the GEMM reads it: a pointer and the
/// distance, in values, between rows.
#[derive(Clone, Copy)]
pub(crate) struct Strided {
    at: *const f32,
    row_stride: usize,
}

impl Strided {
    pub(crate) fn row_major(at: *const f32, row_stride: usize) -> Self {
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
pub(crate) unsafe fn overwrite_product(
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
pub(crate) struct SharedOut(pub(crate) *mut f32);

// SAFETY: tasks write disjoint values, and the buffer outlives them.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    pub(crate) fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}
