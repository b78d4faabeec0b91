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

/// Bytes in a cache line on the x86-64 CPUs the tiles run on.
pub(crate) const LINE_BYTES: usize = 64;

/// Floats from a cache line's start (64 bytes, an AVX-512 vector), for the
/// panels the tiles load a vector at a time: a load that straddles two
/// lines costs a second L1 access on Intel's cores, and glibc hands out
/// large blocks 16 bytes past a line, so a plain Vec's panels would all
/// straddle.
pub(crate) struct LineAligned {
    values: Vec<f32>,
    start: usize,
}

impl LineAligned {
    /// `len` slots from a line's start, to be written whole.
    pub(crate) fn unwritten(len: usize) -> UnwrittenLines {
        let mut buffer = Unwritten::new(len + LINE_BYTES / size_of::<f32>() - 1);
        let at = buffer.buffer.as_ptr() as usize;
        let start = (at.next_multiple_of(LINE_BYTES) - at) / size_of::<f32>();
        buffer.len = start + len;
        UnwrittenLines { buffer, start }
    }

    /// `len` zeros from a line's start.
    pub(crate) fn zeroed(len: usize) -> Self {
        let mut zeros = Self::unwritten(len);
        zeros.slots().fill(MaybeUninit::new(0.0));
        // SAFETY: every slot was written.
        unsafe { zeros.assume_written() }
    }
}

impl std::ops::Deref for LineAligned {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.values[self.start..]
    }
}

impl std::ops::DerefMut for LineAligned {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.values[self.start..]
    }
}

impl AsRef<[f32]> for LineAligned {
    fn as_ref(&self) -> &[f32] {
        self
    }
}

/// [`LineAligned::unwritten`]'s slots, before they are written.
pub(crate) struct UnwrittenLines {
    buffer: Unwritten,
    start: usize,
}

impl UnwrittenLines {
    pub(crate) fn slots(&mut self) -> &mut [MaybeUninit<f32>] {
        &mut self.buffer.slots()[self.start..]
    }

    /// # Safety
    /// Every one of the slots has been written.
    pub(crate) unsafe fn assume_written(mut self) -> LineAligned {
        self.buffer.slots()[..self.start].fill(MaybeUninit::new(0.0));
        // SAFETY: the caller's contract, and the slots before the line's
        // start, written just now.
        LineAligned { values: unsafe { self.buffer.assume_written() }, start: self.start }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_aligned_values_start_on_a_line() {
        // Sizes on both sides of glibc's switch to mapped blocks (128 KiB),
        // where blocks start 16 bytes past a page.
        for len in [0, 1, 15, 16, 17, 1000, 40_000, 1 << 20] {
            let mut written = LineAligned::unwritten(len);
            for (i, slot) in written.slots().iter_mut().enumerate() {
                slot.write(i as f32);
            }
            // SAFETY: every slot was written just above.
            let written = unsafe { written.assume_written() };
            let zeros = LineAligned::zeroed(len);
            for values in [&written, &zeros] {
                assert_eq!(values.len(), len);
                assert_eq!(values.as_ptr() as usize % 64, 0, "{len} values");
            }
            assert!(written.iter().enumerate().all(|(i, &v)| v == i as f32) && zeros.iter().all(|&v| v == 0.0));
        }
    }
}
