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

/// `--mass`: a share of attention to keep, in (0, 1]; 0 keeps no patch.
pub fn mass(text: &str) -> Result<f32, String> {
    let x: f32 = number(text, "a number")?;
    if !(x > 0.0 && x <= 1.0) {
        return Err(format!("must be above 0 and at most 1, got {x}"));
    }
    Ok(x)
}

/// `--tau`: a cosine similarity in [0, 1); at 1 no two patches are linked.
pub fn tau(text: &str) -> Result<f64, String> {
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

/// Worker threads for `requested` jobs: all cores by default, and no more
/// than twice the cores, with a note when the request is cut.
pub fn worker_threads(requested: Option<usize>) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    match requested {
        None => cores,
        Some(n) if n > 2 * cores => {
            eprintln!("segattn: --jobs {n} capped at {} (twice the {cores} cores): more threads only wait", 2 * cores);
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
        assert!(mass("0").is_err() && mass("5").is_err() && mass("-1").is_err() && mass("nan").is_err());
        assert_eq!(mass("1"), Ok(1.0));
        assert!(tau("nan").is_err() && tau("5").is_err() && tau("1").is_err() && tau("0.2").is_ok());
        assert!(unit_interval("1.5").is_err() && unit_interval("0").is_ok());
        assert!(suffix("/../../x").is_err() && suffix("_mask").is_ok());
    }
}
