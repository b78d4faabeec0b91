//! Running work items in parallel with a progress bar, reporting each
//! failure and finishing the rest.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rayon::prelude::*;

use super::jobs::{Job, Rejected};
use super::{EXIT_OK, EXIT_SOME_FAILED};

/// Runs `work` on every item on `threads` threads (default: all cores),
/// with a progress bar on a terminal. Each success's record goes to
/// `record`; each failure is printed as `segattn: NAME: reason`. Returns the
/// number of failures.
pub fn for_each<T, W, R>(
    items: &[T],
    name: impl Fn(&T) -> String + Sync,
    threads: Option<usize>,
    work: W,
    record: R,
) -> Result<usize>
where
    T: Sync,
    W: Fn(&T) -> Result<serde_json::Value> + Sync,
    R: Fn(serde_json::Value) + Sync,
{
    let progress = if std::io::stderr().is_terminal() && items.len() > 1 {
        ProgressBar::with_draw_target(Some(items.len() as u64), ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    progress.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} images, {elapsed} elapsed, {eta} left")
            .expect("valid template"),
    );
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(super::values::worker_threads(threads))
        .build()
        .context("cannot start worker threads")?;
    let failed = AtomicUsize::new(0);
    pool.install(|| {
        items.par_iter().for_each(|item| {
            match work(item) {
                Ok(value) => record(value),
                Err(err) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    progress.suspend(|| eprintln!("segattn: {}: {}", escaped(&name(item)), one_line(&err)));
                }
            }
            progress.inc(1);
        })
    });
    progress.finish_and_clear();
    Ok(failed.into_inner())
}

/// Runs `work` on every job; prints each record as a JSON line when `json` is
/// set. Returns the exit code: 0 if everything succeeded, 1 otherwise.
pub fn run<F>(jobs: Vec<Job>, rejected: Vec<Rejected>, threads: Option<usize>, json: bool, work: F) -> Result<u8>
where
    F: Fn(&Job) -> Result<serde_json::Value> + Sync,
{
    for r in &rejected {
        eprintln!("segattn: {}: {}", escaped(&r.name), r.reason.replace('\n', " "));
    }
    let print = |value: serde_json::Value| {
        if json {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{value}");
        }
    };
    let failed = for_each(&jobs, |job| job.source.display_name(), threads, work, print)?;
    Ok(if failed + rejected.len() == 0 { EXIT_OK } else { EXIT_SOME_FAILED })
}

/// A file name as it can be printed on one line: control characters (a
/// newline in a name, say) escaped as Rust writes them, the rest unchanged.
pub fn escaped(name: &str) -> String {
    name.chars().map(|c| if c.is_control() { c.escape_debug().to_string() } else { c.to_string() }).collect()
}

/// An error and its causes on one line: decoders put line breaks in their
/// messages, and a script reads one failure per line. A cause that its
/// parent's message already quotes is left out.
pub fn one_line(err: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in err.chain() {
        let text = cause.to_string().split_whitespace().collect::<Vec<_>>().join(" ");
        if !parts.last().is_some_and(|previous| previous.contains(&text)) {
            parts.push(text);
        }
    }
    parts.join(": ")
}
