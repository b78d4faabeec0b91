//! CPU kernels for vision-transformer inference, on slices of `f32`:
//!
//! - [`matmul`]: `x · Wᵀ`, with W packed once ([`PackedWeight`]) in the
//!   panels its kernel reads, and [`linear`], `x · Wᵀ + bias`;
//! - [`attention`]: multi-head softmax(Q Kᵀ · scale) V, fused, never
//!   building the attention matrix, with the class token's row on request;
//! - the passes between them ([`bias_gelu`], [`layer_norm`],
//!   [`residual_layer_norm`]), one pass each.
//!
//! On x86-64 CPUs with AVX-512, or AVX2 + FMA, the products run on register
//! tiles written once for both (`simd`, `tile_matmul`, `tile_attention`);
//! elsewhere, and for attention heads other than 64 dimensions, on the gemm
//! crate (`portable`). Each instruction set's kernels form one table
//! (`dispatch`), chosen at run time; the drivers (`matmul`, `attention`)
//! share out the work and call through it, on operands laid out as
//! `layout` says. On request ([`Precision::Bf16`]), the
//! linear layers and the attention multiply in bfloat16 on CPUs with
//! AVX512-BF16, on the same tiles. Work is shared out on rayon's pool.

/// `fn name(args) = portable`: `name` runs `portable` compiled for the widest
/// vectors the CPU has (AVX-512, else AVX2 + FMA, else baseline) that
/// [`set_limit`] allows, chosen at run time as the kernels are
/// ([`simd::widest`]), so one plain-Rust loop gets each machine's vector width.
macro_rules! widest_vectors {
    ($(#[$doc:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) = $portable:ident) => {
        $(#[$doc])*
        $vis fn $name($($arg: $ty),*) {
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
                match $crate::simd::widest().map($crate::simd::Isa::width) {
                    // SAFETY: an `Isa` is made only for an instruction set the CPU has.
                    Some($crate::simd::Width::Avx512) => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above.
                    Some($crate::simd::Width::Avx2) => return unsafe { avx2($($arg),*) },
                    None => {}
                }
            }
            $portable($($arg),*)
        }
    };
}

mod attention;
mod awake;
mod buffers;
mod caches;
mod dispatch;
mod exp;
mod layout;
mod matmul;
mod peak;
mod portable;
mod rows;
#[cfg(target_arch = "x86_64")]
mod simd;
mod stages;
#[cfg(target_arch = "x86_64")]
mod tile_attention;
#[cfg(target_arch = "x86_64")]
mod tile_matmul;

use std::sync::OnceLock;

pub use attention::{Attended, attention, timed_attention};
pub use awake::KeepAwake;
pub use caches::{Caches, caches};
pub use layout::Precision;
pub use matmul::{PackedWeight, linear, linear_gelu, matmul};
pub use peak::{Peak, measure_peak};
pub use rows::{Norm, bias_gelu, layer_norm, residual_layer_norm};
pub use stages::{Stage, StageTimes};

/// A shape (or a scale) the kernels cannot work on, in words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeError(String);

impl ShapeError {
    fn new(message: String) -> Self {
        Self(message)
    }
}

impl std::fmt::Display for ShapeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ShapeError {}

/// The widest instruction set the kernels may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// Whatever the CPU has.
    Widest,
    /// AVX2 + FMA at most, as on CPUs without AVX-512.
    Avx2,
    /// No hand-written vector kernels: the gemm crate and plain loops.
    Portable,
}

static LIMIT: OnceLock<Limit> = OnceLock::new();

/// Caps the instruction sets the kernels use, to run or test a narrower
/// path on a wider CPU. It takes effect only before the first kernel runs
/// (the choice is made once per process); returns whether it did.
pub fn set_limit(limit: Limit) -> bool {
    LIMIT.set(limit).is_ok()
}

fn limit() -> Limit {
    *LIMIT.get_or_init(|| Limit::Widest)
}

/// The kernels that compute `x · Wᵀ` in `precision` (or in f32, where it
/// is not available) and the attention of heads of `head_dim` dimensions on
/// this machine, in words.
pub fn kernel_names(precision: Precision, head_dim: usize) -> (String, String) {
    (
        dispatch::Kernels::best(precision).matmul_name.to_string(),
        dispatch::Kernels::best_attention(head_dim, precision).attention_name.to_string(),
    )
}

/// Deterministic values in [-2, 2), for test inputs.
#[cfg(test)]
pub(crate) fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0
        })
        .collect()
}
