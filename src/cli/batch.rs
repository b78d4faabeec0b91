//! Running work items in parallel with a progress bar, reporting each
//! failure and finishing the rest.

use std::fs::File;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::{Mutex, PoisonError};

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rayon::prelude::*;

use serde_json::json;

use super::jobs::{self, Job, Plan};
use super::{BatchArgs, EXIT_OK, EXIT_SOME_FAILED};
use crate::hub::HubError;
use crate::image_io::{DecodeError, Source};

/// Runs `work` on every item on `threads` threads (default: all cores),
/// with a progress bar on a terminal, and returns each item's result in
/// order: `None` where it failed, after printing `segattn: NAME: reason`.
pub fn for_each<T, R, W>(
    items: &[T],
    name: impl Fn(&T) -> String + Sync,
    threads: Option<usize>,
    work: W,
) -> Result<Vec<Option<R>>>
where
    T: Sync,
    R: Send,
    W: Fn(&T) -> Result<R> + Sync,
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
    let results = pool.install(|| {
        items
            .par_iter()
            .map(|item| {
                let result = work(item);
                if let Err(err) = &result {
                    progress.suspend(|| note!("segattn: {}: {}", escaped(&name(item)), one_line(err)));
                }
                progress.inc(1);
                result.ok()
            })
            .collect()
    });
    progress.finish_and_clear();
    Ok(results)
}

/// Where each image's JSON line goes: standard output (--json) and the
/// --report file. A line that cannot be written fails its image.
struct Reporter {
    json: bool,
    report: Option<Mutex<File>>,
}

impl Reporter {
    fn line(&self, value: &serde_json::Value) -> Result<()> {
        let line = format!("{value}\n");
        if self.json {
            super::output::write_stdout(line.as_bytes()).context("cannot write the JSON line")?;
        }
        if let Some(report) = &self.report {
            let mut file = report.lock().unwrap_or_else(PoisonError::into_inner);
            file.write_all(line.as_bytes()).context("cannot write to the --report file")?;
        }
        Ok(())
    }
}

/// Runs `work` on every planned job; reports each result, failure and skip
/// as a JSON line (--json, --report). Returns the exit code: 0 if every
/// photo succeeded or was skipped, 1 otherwise.
pub fn run<F>(plan: Plan, args: &BatchArgs, model_files: &[&Path], work: F) -> Result<u8>
where
    F: Fn(&Job) -> Result<serde_json::Value> + Sync,
{
    let plan = plan.make_output_dirs();
    let report = match &args.report {
        Some(path) => {
            let inputs = plan.jobs.iter().filter_map(|j| match &j.source {
                Source::File(p) => Some(p.as_path()),
                Source::Stdin => None,
            });
            let outputs = plan.jobs.iter().flat_map(|j| j.output_files());
            jobs::refuse_overwrite(path, inputs.chain(outputs).chain(model_files.iter().copied()))?;
            let file = File::options()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("{}: cannot open the report", path.display()))?;
            Some(Mutex::new(file))
        }
        None => None,
    };
    let reporter = Reporter { json: args.json, report };
    let mut failed = 0;
    for r in &plan.rejected {
        note!("segattn: {}: {}", escaped(&r.name), r.reason.replace('\n', " "));
        reporter.line(&json!({ "input": r.name, "error": r.reason }))?;
        failed += 1;
    }
    for name in &plan.skipped {
        reporter.line(&json!({ "input": name, "skipped": "outputs exist" }))?;
    }
    if !plan.skipped.is_empty() {
        note!("segattn: skipped {} photos whose outputs exist (--skip-existing)", plan.skipped.len());
    }
    if let (Some(shard), Some(all)) = (args.shard, plan.all_shards)
        && plan.jobs.is_empty()
        && plan.skipped.is_empty()
    {
        note!("segattn: shard {shard} holds none of the {all} photos");
    }
    let results = for_each(
        &plan.jobs,
        |job| job.source.display_name(),
        args.work.jobs,
        |job| {
            let result = work(job);
            let line = match &result {
                Ok(value) => value.clone(),
                Err(err) => json!({ "input": job.source.display_name(), "error": one_line(err) }),
            };
            // A failure stays the image's error even if its line cannot be written.
            let reported = reporter.line(&line);
            result.and_then(|value| reported.map(|()| value))
        },
    )?;
    failed += results.iter().filter(|r| r.is_none()).count();
    Ok(if failed == 0 { EXIT_OK } else { EXIT_SOME_FAILED })
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
    parts.join(": ") + &hint(err)
}

/// What the command line can add to a library error: the flag or command
/// that changes the outcome.
fn hint(err: &anyhow::Error) -> String {
    for cause in err.chain() {
        match cause.downcast_ref::<DecodeError>() {
            Some(DecodeError::TooManyPixels { .. }) => return " (see --max-pixels)".into(),
            Some(DecodeError::DamagedJpeg(_)) => return "; --lenient decodes what it can".into(),
            _ => {}
        }
        match cause.downcast_ref::<HubError>() {
            Some(HubError::NotCached { name, .. }) => {
                return format!(
                    " (--offline or HF_HUB_OFFLINE): run `segattn fetch {name}` where the Hub is reachable"
                );
            }
            Some(HubError::DownloadFailed { name, .. }) => return format!("; `segattn fetch {name}` resumes it"),
            None => {}
        }
    }
    String::new()
}
