//! segattn: find the main object in a photo with a vision transformer and
//! show where the transformer looks.
//!
//! The data path reads top to bottom, each module using only those above it
//! ([`fnv`], a hash, serves any of them):
//! [`image_io`] -> [`preprocess`] -> [`model`] (-> [`hub`], which finds
//! checkpoints by name) -> [`maps`] -> [`attention`] -> [`head`]
//! -> [`metrics`] -> [`train`] / [`render`] -> [`cli`].

/// `eprintln!` that cannot panic: a line that a closed or full standard
/// error cannot take is dropped, as there is nowhere left to report it.
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

pub mod attention;
pub mod cli;
pub mod fnv;
pub mod head;
pub mod hub;
pub mod image_io;
pub mod maps;
pub mod metrics;
pub mod model;
pub mod preprocess;
pub mod render;
pub mod serve;
pub mod temp_files;
pub mod train;

/// Process-wide runtime settings; call first thing in `main`.
///
/// candle's elementwise worker threads spin for a long while waiting for
/// work, which on a small machine takes a core from the matrix products and
/// the fused attention running beside them. A short spin, then sleep, avoids it.
/// An explicit `CANDLE_BARRIER_POOL_SPIN_LIMIT` is left alone.
///
/// glibc serves allocations above its mmap threshold (a few MB at most) with
/// fresh pages and unmaps them on free, so every activation tensor of a
/// forward pass costs page faults and zeroing in the kernel. Raising the
/// threshold and the trim limit keeps freed buffers for reuse, at the price
/// of holding on to the largest working set the process has needed. One
/// arena for all threads: the encoder runs on a pool's thread, and a thread's
/// own arena grows in heaps of at most 64 MB, so the large activations of a
/// long sequence there would be mapped and unmapped afresh, with page faults
/// and zeroing on every pass, as above.
///
/// # Safety
/// Sets an environment variable and allocator options: no other thread may be running.
pub unsafe fn configure_runtime() {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        // SAFETY: the caller guarantees the process is still single-threaded.
        unsafe { std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "10") };
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; no thread is allocating concurrently.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}
