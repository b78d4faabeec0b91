//! The CPU's floating-point peak, measured on the running machine, so that
//! benchmarks can give their rates as a share of it: a VM's `cpu MHz` is
//! its base clock, not the boosted one the kernels run at, and nothing
//! reports how many FMA units a core has.

use crate::dispatch::Kernels;
use crate::layout::Precision;

/// The peak of the products' instruction set on one core.
#[derive(Clone, Copy, Debug)]
pub struct Peak {
    /// From a timed chain of dependent register-to-register integer adds,
    /// one cycle each on every x86-64 core.
    pub clock_hz: f64,
    /// From timed independent FMAs of the products' instruction set, on
    /// one thread: FMA units x lanes x 2 (a multiply-add is two operations).
    pub flops_per_second: f64,
    /// f32 lanes a vector FMA multiplies (twice the vector's lanes for
    /// bfloat16 pairs).
    pub lanes: usize,
}

impl Peak {
    pub fn flops_per_cycle(&self) -> f64 {
        self.flops_per_second / self.clock_hz
    }

    /// Vector FMAs a cycle: the FMA units, counted in full-width vectors.
    pub fn fmas_per_cycle(&self) -> f64 {
        self.flops_per_cycle() / (2 * self.lanes) as f64
    }
}

/// The peak of the kernels that run the products in `precision` here;
/// `None` where those are the gemm crate's (no tiles of our own), or off
/// x86-64.
pub fn measure_peak(precision: Precision) -> Option<Peak> {
    let kernels = Kernels::best(precision);
    let flops_per_second = kernels.fma_rate()?;
    Some(Peak { clock_hz: clock_hz()?, flops_per_second, lanes: kernels.multiplied_lanes()? })
}

/// Adds a second, by the time of chains of dependent adds: the best of 20
/// runs of some 3 ms, as for the FMA rate. The adds take their operand from
/// a register: Intel's cores since Golden Cove fold adds of an immediate
/// at rename, several a cycle, which read as a 20 GHz clock.
#[cfg(target_arch = "x86_64")]
fn clock_hz() -> Option<f64> {
    const ITERATIONS: u64 = 1_250_000;
    const ADDS: u64 = 8;
    let time = |iterations: u64| -> std::time::Duration {
        let start = std::time::Instant::now();
        // SAFETY: registers only: eight adds to one register, each waiting
        // for the last, and a count down to zero.
        unsafe {
            std::arch::asm!(
                "2:",
                "add {x}, {one}", "add {x}, {one}", "add {x}, {one}", "add {x}, {one}",
                "add {x}, {one}", "add {x}, {one}", "add {x}, {one}", "add {x}, {one}",
                "dec {n}",
                "jnz 2b",
                x = inout(reg) 0u64 => _,
                one = in(reg) 1u64,
                n = inout(reg) iterations => _,
                options(nomem, nostack),
            );
        }
        start.elapsed()
    };
    let best = (0..20).map(|_| time(ITERATIONS)).min()?;
    Some((ITERATIONS * ADDS) as f64 / best.as_secs_f64())
}

#[cfg(not(target_arch = "x86_64"))]
fn clock_hz() -> Option<f64> {
    None
}
