//! Counters for `GET /metrics`, in Prometheus' text format: requests by
//! status, a latency histogram, and the queue's depth.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 10] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    by_status: BTreeMap<u16, u64>,
    events: BTreeMap<&'static str, u64>,
    /// Requests at or under each bucket's bound, and in all.
    buckets: [u64; BUCKETS.len()],
    count: u64,
    seconds: f64,
}

impl Metrics {
    pub fn record(&self, status: u16, took: Duration) {
        let Ok(mut counts) = self.inner.lock() else { return };
        *counts.by_status.entry(status).or_default() += 1;
        let seconds = took.as_secs_f64();
        for (bucket, bound) in counts.buckets.iter_mut().zip(BUCKETS) {
            *bucket += u64::from(seconds <= bound);
        }
        counts.count += 1;
        counts.seconds += seconds;
    }

    /// Counts an event that is not a request answered in full (`busy`: a
    /// connection refused because too many are open).
    pub fn count(&self, event: &'static str) {
        if let Ok(mut counts) = self.inner.lock() {
            *counts.events.entry(event).or_default() += 1;
        }
    }

    pub fn render(&self, queue_depth: usize) -> String {
        let Ok(counts) = self.inner.lock() else { return String::new() };
        let mut text = String::new();
        let _ = writeln!(text, "# TYPE segattn_requests_total counter");
        for (status, n) in &counts.by_status {
            let _ = writeln!(text, "segattn_requests_total{{status=\"{status}\"}} {n}");
        }
        let _ = writeln!(text, "# TYPE segattn_refused_connections_total counter");
        let _ = writeln!(text, "segattn_refused_connections_total {}", counts.events.get("busy").unwrap_or(&0));
        let _ = writeln!(text, "# TYPE segattn_request_seconds histogram");
        for (bound, n) in BUCKETS.iter().zip(counts.buckets) {
            let _ = writeln!(text, "segattn_request_seconds_bucket{{le=\"{bound}\"}} {n}");
        }
        let _ = writeln!(text, "segattn_request_seconds_bucket{{le=\"+Inf\"}} {}", counts.count);
        let _ = writeln!(text, "segattn_request_seconds_sum {}", counts.seconds);
        let _ = writeln!(text, "segattn_request_seconds_count {}", counts.count);
        let _ = writeln!(text, "# TYPE segattn_queue_depth gauge");
        let _ = writeln!(text, "segattn_queue_depth {queue_depth}");
        text
    }
}
