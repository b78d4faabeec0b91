//! Keeping the pool's idle threads awake through a run of parallel regions,
//! such as an encoder's forward pass.
//!
//! A rayon worker that finds no work yields a few dozen times, then sleeps,
//! and waking it again costs a scheduler round trip (tens of microseconds,
//! more in a virtual machine). Between two of a layer's products the thread
//! that runs the layers does a short serial pass, long enough for the others
//! to fall asleep, so each region started with its helpers still waking,
//! and at a few hundred tokens the waking added up to several percent of the
//! forward. While a [`KeepAwake`] lives, each other worker of the pool runs a job that
//! takes whatever work the pool has as soon as it appears, and spins, not
//! sleeps, between.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// A job that finds no work for this long returns, and its worker may
/// sleep, so that a caller that has stopped issuing work (or is blocked)
/// gives the core back. Inside a forward pass a worker waits a millisecond
/// or more at times, for a region's last task on another core, or for a
/// core the host has taken away for a while.
const IDLE_LIMIT: Duration = Duration::from_millis(5);

/// A job that starts this long after it was spawned returns at once: no
/// worker was idle to take it then, so the pool is busy without it, and a
/// worker that took it later might be waiting inside other work, which would
/// wait on this job.
const STALE_AFTER: Duration = Duration::from_millis(1);

/// Jobs in their loop, for the tests.
static SPINNING: AtomicUsize = AtomicUsize::new(0);

/// While this lives, the other workers of the current rayon pool (the global
/// one outside any) take its work as it appears and spin between, rather
/// than sleep; see the module's documentation. Dropping it lets them go.
#[must_use = "the workers stay awake only while the guard lives"]
pub struct KeepAwake {
    done: Arc<AtomicBool>,
}

impl KeepAwake {
    /// Hands each other worker of the current pool a job that keeps it
    /// awake until the guard drops (or it finds no work for a while).
    pub fn start() -> Self {
        let done = Arc::new(AtomicBool::new(false));
        let owner = rayon::current_thread_index();
        let spawned = Instant::now();
        for _ in 1..rayon::current_num_threads() {
            let done = done.clone();
            rayon::spawn(move || {
                // The thread that started the guard, back at its own queue,
                // or a late start: nothing to keep awake.
                if rayon::current_thread_index() == owner || spawned.elapsed() > STALE_AFTER {
                    return;
                }
                SPINNING.fetch_add(1, Ordering::Relaxed);
                let mut idle_since = Instant::now();
                while !done.load(Ordering::Relaxed) {
                    match rayon::yield_now() {
                        Some(rayon::Yield::Executed) => idle_since = Instant::now(),
                        _ if idle_since.elapsed() > IDLE_LIMIT => break,
                        _ => std::hint::spin_loop(),
                    }
                }
                SPINNING.fetch_sub(1, Ordering::Relaxed);
            });
        }
        Self { done }
    }
}

impl Drop for KeepAwake {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    /// Polls `condition` for up to a second.
    fn within_a_second(condition: impl Fn() -> bool) -> bool {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(1) {
            if condition() {
                return true;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        false
    }

    /// A guard that has the pool's other worker spinning. A worker that
    /// wakes late (a loaded machine) drops its job as stale: a few tries.
    fn awake_guard() -> KeepAwake {
        for _ in 0..20 {
            let guard = KeepAwake::start();
            if within_a_second(|| SPINNING.load(Ordering::Relaxed) == 1) {
                return guard;
            }
        }
        panic!("no worker kept awake in 20 tries");
    }

    // The tests share `SPINNING`: one test runs every case, in turn.
    #[test]
    fn workers_spin_while_the_guard_lives_and_stop_after() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        pool.install(|| {
            // Dropped: the other worker leaves its loop.
            let guard = awake_guard();
            drop(guard);
            assert!(within_a_second(|| SPINNING.load(Ordering::Relaxed) == 0), "a worker still spins");

            // Kept, but given no work: it leaves after the idle limit.
            let guard = awake_guard();
            assert!(within_a_second(|| SPINNING.load(Ordering::Relaxed) == 0), "an idle worker spins on");
            drop(guard);
        });

        // Guards inside a busy pool's nested work, as a batch of photos has
        // them: every item's sums come out, and no worker spins after.
        let pool = rayon::ThreadPoolBuilder::new().num_threads(4).build().unwrap();
        let sums: Vec<u64> = pool.install(|| {
            (0..64u64)
                .into_par_iter()
                .map(|item| {
                    let _awake = KeepAwake::start();
                    (0..10_000u64).into_par_iter().map(|i| i * item).sum()
                })
                .collect()
        });
        assert!(sums.iter().enumerate().all(|(item, &sum)| sum == item as u64 * 49_995_000));
        assert!(within_a_second(|| SPINNING.load(Ordering::Relaxed) == 0), "a worker still spins");
    }
}
