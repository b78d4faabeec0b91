//! The sizes of the CPU's data caches, read once, which the kernels' blocks
//! are sized from: the same code runs on a laptop with 256 KiB of L2 and a
//! server with 2 MiB.

use std::sync::OnceLock;

/// Data cache sizes, in bytes, as one core sees them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caches {
    pub l1d: usize,
    /// Per core on every x86-64 that has one.
    pub l2: usize,
    /// Shared by some or all cores.
    pub l3: usize,
    /// Where the sizes came from: "CPUID", "sysfs", or "assumed" (the
    /// smallest of common x86-64 cores: 32 KiB, 256 KiB, 4 MiB).
    pub source: &'static str,
}

const ASSUMED: Caches = Caches { l1d: 32 << 10, l2: 256 << 10, l3: 4 << 20, source: "assumed" };

/// This CPU's caches, read the first time.
pub fn caches() -> Caches {
    static CACHES: OnceLock<Caches> = OnceLock::new();
    *CACHES.get_or_init(|| from_cpuid().or_else(from_sysfs).unwrap_or(ASSUMED))
}

/// A data or unified cache of `level`, in a list of (level, is data or
/// unified, size): what the CPU's cache leaves and sysfs both list.
fn sizes(found: impl Iterator<Item = (u32, bool, usize)>, source: &'static str) -> Option<Caches> {
    let (mut l1d, mut l2, mut l3) = (0, 0, 0);
    for (level, _, size) in found.filter(|&(_, holds_data, _)| holds_data) {
        match level {
            1 => l1d = size,
            2 => l2 = size,
            3 => l3 = size,
            _ => {}
        }
    }
    // A CPU without an L3 (some small ones) gets its L2 there: blocks sized
    // for the L3 then still fit.
    (l1d > 0 && l2 > 0).then_some(Caches { l1d, l2, l3: if l3 > 0 { l3 } else { l2 }, source })
}

/// The deterministic cache parameters: leaf 4 on Intel, 0x8000_001D on AMD
/// (same layout; the other vendor's leaf reads as no caches).
#[cfg(target_arch = "x86_64")]
fn from_cpuid() -> Option<Caches> {
    use std::arch::x86_64::__cpuid_count;
    // Leaves above the highest a CPU reports read as another leaf's values.
    let (highest, highest_extended) = (__cpuid_count(0, 0).eax, __cpuid_count(0x8000_0000, 0).eax);
    [4, 0x8000_001D]
        .into_iter()
        .filter(|&leaf| leaf <= if leaf < 0x8000_0000 { highest } else { highest_extended })
        .find_map(|leaf| {
            let found = (0..16).map_while(|index| {
                let r = __cpuid_count(leaf, index);
                let kind = r.eax & 0x1f;
                (kind != 0).then(|| {
                    let level = (r.eax >> 5) & 0x7;
                    let ways = (r.ebx >> 22) as usize + 1;
                    let partitions = ((r.ebx >> 12) & 0x3ff) as usize + 1;
                    let line = (r.ebx & 0xfff) as usize + 1;
                    let sets = r.ecx as usize + 1;
                    // Kind 1 is data, 2 instructions, 3 unified.
                    (level, kind != 2, ways * partitions * line * sets)
                })
            });
            sizes(found, "CPUID")
        })
}

#[cfg(not(target_arch = "x86_64"))]
fn from_cpuid() -> Option<Caches> {
    None
}

/// Linux's list of the first CPU's caches.
fn from_sysfs() -> Option<Caches> {
    let read = |index: usize, name: &str| {
        std::fs::read_to_string(format!("/sys/devices/system/cpu/cpu0/cache/index{index}/{name}")).ok()
    };
    let found = (0..16).map_while(|index| {
        let level = read(index, "level")?.trim().parse().ok()?;
        let holds_data = read(index, "type")?.trim() != "Instruction";
        let size = read(index, "size")?;
        let kib: usize = size.trim().strip_suffix('K')?.parse().ok()?;
        Some((level, holds_data, kib << 10))
    });
    sizes(found, "sysfs")
}

/// This CPU's caches, and caches small enough that the kernels' blocks,
/// sized from them, split the tests' small operands: a product's rows into
/// runs, an attention's query rows into groups and V into chunks.
#[cfg(test)]
pub(crate) fn for_tests() -> [Caches; 3] {
    let small = |l1d: usize, l2: usize| Caches { l1d, l2, l3: l2, source: "test" };
    [caches(), small(4 << 10, 16 << 10), small(1 << 10, 4 << 10)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caches_are_read_and_agree_with_linux() {
        let caches = caches();
        assert!(caches.l1d >= 8 << 10 && caches.l2 > caches.l1d && caches.l3 >= caches.l2, "{caches:?}");
        // Where both can be read, Linux lists what CPUID says.
        if let (Some(cpuid), Some(sysfs)) = (from_cpuid(), from_sysfs()) {
            assert_eq!((cpuid.l1d, cpuid.l2, cpuid.l3), (sysfs.l1d, sysfs.l2, sysfs.l3));
        }
    }

    #[test]
    fn an_instruction_cache_is_not_a_data_cache() {
        let listed = [(1, true, 48 << 10), (1, false, 32 << 10), (2, true, 2 << 20)];
        let caches = sizes(listed.into_iter(), "test").unwrap();
        assert_eq!((caches.l1d, caches.l2, caches.l3), (48 << 10, 2 << 20, 2 << 20));
        assert_eq!(sizes([(1, true, 32 << 10)].into_iter(), "test"), None);
    }
}
