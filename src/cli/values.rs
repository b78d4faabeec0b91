//! Parsers for numeric and name arguments: every range is checked when the
//! command line is read, so a bad value is one line and exit code 2 before
//! any model loads, never a silently odd result.

use std::ops::RangeInclusive;
use std::str::FromStr;

/// Short sides the model may be fed: below 32 pixels no model has more than
/// a few patches; above 4096 the patch budget scales the image down anyway.
pub const SHORT_SIDES: RangeInclusive<usize> = 32..=4096;

fn number<T: FromStr>(text: &str, what: &str) -> Result<T, String> {
    text.trim().parse().map_err(|_| format!("{text:?} is not {what}"))
}

/// `--size`: pixels of the input's short side.
pub fn short_side(text: &str) -> Result<usize, String> {
    let n: usize = number(text, "a whole number of pixels")?;
    if !SHORT_SIDES.contains(&n) {
        return Err(format!("must be {} to {} pixels, got {n}", SHORT_SIDES.start(), SHORT_SIDES.end()));
    }
    Ok(n)
}

/// A count of at least one: `--jobs` (the cap on too many is
/// [`worker_threads`]) and `--min-heads` (its upper bound depends on the
/// model and is checked when the head is built).
pub fn at_least_one(text: &str) -> Result<usize, String> {
    let n: usize = number(text, "a whole number")?;
    if n == 0 {
        return Err("must be at least 1".into());
    }
    Ok(n)
}

/// A number in [0, 1]: `--threshold`.
pub fn unit_interval(text: &str) -> Result<f32, String> {
    let x: f32 = number(text, "a number")?;
    if !(0.0..=1.0).contains(&x) {
        return Err(format!("must be between 0 and 1, got {x}"));
    }
    Ok(x)
}

/// A number in (0, 1]: `--mass`, a share of attention to keep (0 keeps no
/// patch); `train-head --lr`, an AdamW learning rate (NaN or a huge one
/// would write a head of NaN or of huge values).
pub fn above_zero_to_one<T: FromStr + PartialOrd + From<f32> + std::fmt::Display>(text: &str) -> Result<T, String> {
    let x: T = number(text, "a number")?;
    if !(x > T::from(0.0) && x <= T::from(1.0)) {
        return Err(format!("must be above 0 and at most 1, got {x}"));
    }
    Ok(x)
}

/// A number in [0, 1): `--tau`, a cosine similarity (at 1 no two patches
/// are linked); `train-head --val-split`, the share of photos held out.
pub fn zero_to_below_one(text: &str) -> Result<f64, String> {
    let x: f64 = number(text, "a number")?;
    if !(0.0..1.0).contains(&x) {
        return Err(format!("must be at least 0 and below 1, got {x}"));
    }
    Ok(x)
}

/// `--suffix`: appended to a file name, so it may not lead anywhere else.
pub fn suffix(text: &str) -> Result<String, String> {
    if text.contains(['/', '\\']) || text.contains('\0') {
        return Err(format!("{text:?} may not hold a path separator: outputs stay inside --out-dir"));
    }
    Ok(text.to_string())
}

/// `--shard K/N`: this machine's part, K from 0 to N-1 (Kubernetes'
/// `JOB_COMPLETION_INDEX` is such a K; Slurm's `SLURM_ARRAY_TASK_ID` too,
/// with an array of 0-(N-1)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: u64,
    pub count: u64,
}

impl Shard {
    /// Whether the input at `relative` (its path below its input root) is in
    /// this shard. FNV-1a of the path's bytes: fixed by its definition, so
    /// every machine and every segattn version splits the same way.
    pub fn holds(&self, relative: &[u8]) -> bool {
        crate::fnv::fnv1a_64(relative.iter().copied()) % self.count == self.index
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

pub fn shard(text: &str) -> Result<Shard, String> {
    let (k, n) = text.split_once('/').ok_or_else(|| format!("{text:?} is not K/N, e.g. 0/4"))?;
    let index: u64 = number(k, "a whole number")?;
    let count: u64 = number(n, "a whole number")?;
    if count == 0 || index >= count {
        return Err(format!("K must be from 0 to N-1 and N at least 1, got {index}/{count}"));
    }
    Ok(Shard { index, count })
}

/// Worker threads for `requested` jobs: all cores by default, and no more
/// than twice the cores, with a note when the request is cut.
pub fn worker_threads(requested: Option<usize>) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    match requested {
        None => cores,
        Some(n) if n > 2 * cores => {
            note!("segattn: --jobs {n} capped at {} (twice the {cores} cores): more threads only wait", 2 * cores);
            2 * cores
        }
        Some(n) => n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_enforced() {
        assert_eq!(short_side("224"), Ok(224));
        for bad in ["0", "1", "31", "4097", "18446744073709551615", "-1", "x"] {
            assert!(short_side(bad).is_err(), "{bad}");
        }
        assert!(at_least_one("0").is_err() && at_least_one("3") == Ok(3));
        let share = above_zero_to_one::<f32>;
        assert!(share("0").is_err() && share("5").is_err() && share("-1").is_err() && share("nan").is_err());
        assert_eq!(share("1"), Ok(1.0));
        assert!(above_zero_to_one::<f64>("1e30").is_err() && above_zero_to_one::<f64>("5e-3") == Ok(5e-3));
        let below = zero_to_below_one;
        assert!(below("nan").is_err() && below("5").is_err() && below("1").is_err() && below("0.2").is_ok());
        assert!(unit_interval("1.5").is_err() && unit_interval("0").is_ok());
        assert!(suffix("/../../x").is_err() && suffix("_mask").is_ok());
        assert_eq!(shard("2/4"), Ok(Shard { index: 2, count: 4 }));
        for bad in ["4/4", "0/0", "-1/4", "1", "a/b", "1/2/3"] {
            assert!(shard(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn shards_split_by_a_fixed_hash_and_cover_everything_once() {
        // FNV-1a 64 of "a": its published test vector.
        let by_hash_of_a = Shard { index: 0, count: 0xaf63_dc4c_8601_ec8c };
        assert!(by_hash_of_a.holds(b"a") && !by_hash_of_a.holds(b"b"));
        let names: Vec<String> = (0..1000).map(|i| format!("dir/photo_{i}.jpg")).collect();
        let counts: Vec<usize> =
            (0..4).map(|k| names.iter().filter(|n| Shard { index: k, count: 4 }.holds(n.as_bytes())).count()).collect();
        assert_eq!(counts.iter().sum::<usize>(), 1000);
        assert!(counts.iter().all(|&c| (200..300).contains(&c)), "{counts:?}");
    }
}
