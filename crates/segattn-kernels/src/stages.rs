//! Where an attention's time goes, stage by stage, for the benchmark that
//! prints it. The kernels users run take the laps; a stopwatch that is off
//! costs them a branch per stage of a tile of six query rows.

use std::time::{Duration, Instant};

/// The attention's stages, in the order a tile of query rows runs them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Kᵀ and V copied out of the qkv rows, in the kernels' panels.
    Pack,
    /// Q · Kᵀ · scale.
    Scores,
    /// The softmax numerators e^(s - max) and their sum.
    Softmax,
    /// The numerators · V, over their sum.
    Mix,
}

impl Stage {
    pub const ALL: [Stage; 4] = [Stage::Pack, Stage::Scores, Stage::Softmax, Stage::Mix];
}

/// Time spent in each [`Stage`], summed over the threads that ran it.
#[derive(Clone, Copy, Debug, Default)]
pub struct StageTimes([Duration; 4]);

impl StageTimes {
    pub fn get(&self, stage: Stage) -> Duration {
        self.0[stage as usize]
    }

    pub fn total(&self) -> Duration {
        self.0.iter().sum()
    }

    pub(crate) fn charge(&mut self, stage: Stage, time: Duration) {
        self.0[stage as usize] += time;
    }

    pub(crate) fn add(&mut self, other: StageTimes) {
        for (mine, theirs) in self.0.iter_mut().zip(other.0) {
            *mine += theirs;
        }
    }
}

/// A stopwatch that charges the time since its last lap to a stage, or, off,
/// does nothing.
pub(crate) struct Laps {
    last: Option<Instant>,
    times: StageTimes,
}

impl Laps {
    pub(crate) fn new(on: bool) -> Self {
        Self { last: on.then(Instant::now), times: StageTimes::default() }
    }

    /// Charges the time since the last lap (or since the start) to `stage`.
    #[inline(always)]
    pub(crate) fn lap(&mut self, stage: Stage) {
        if let Some(last) = &mut self.last {
            let now = Instant::now();
            self.times.charge(stage, now - *last);
            *last = now;
        }
    }

    pub(crate) fn times(&self) -> StageTimes {
        self.times
    }
}
