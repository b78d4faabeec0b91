//! `segattn serve`: one loaded model answering many HTTP requests.
//!
//! A thread accepts connections (at most [`Options::connections`] at once,
//! each then read under a size and time bound); requests that run the model
//! go into a bounded queue that [`Options::workers`] threads take from. A
//! full queue is answered at once with 503 and `Retry-After`, a request not
//! done within [`Options::timeout`] with 504. On shutdown the listener
//! closes and every request already read is answered before `serve` returns.

mod api;
mod http;
mod metrics;

use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;

pub use api::Service;
use http::{Request, Response};
use metrics::Metrics;

/// The page at `/`, self-contained: no CDN, works offline.
const PAGE: &str = include_str!("page.html");

#[derive(Debug, Clone)]
pub struct Options {
    /// Threads running the model.
    pub workers: usize,
    /// Requests waiting for a worker before more are refused with 503.
    pub queue: usize,
    /// Connections open at once; more are refused with 503.
    pub connections: usize,
    pub max_body: usize,
    /// How long a request may take to arrive.
    pub read_timeout: Duration,
    /// How long a request may wait and run before it is answered with 504.
    pub timeout: Duration,
    /// A bearer token every request but `/healthz` must carry.
    pub token: Option<String>,
}

/// A model request on its way to a worker, and where its answer goes.
struct Work {
    request: Request,
    reply: SyncSender<Response>,
    /// Set when the client's wait is over: the worker skips it.
    abandoned: Arc<AtomicBool>,
}

/// What connection threads share. Workers hold only the service and the
/// queue's receiving end, so that dropping this closes the queue.
struct Shared {
    service: Arc<Service>,
    options: Options,
    metrics: Metrics,
    queue: SyncSender<Work>,
    /// Requests in the queue, not yet taken by a worker.
    waiting: Arc<AtomicUsize>,
}

/// Serves `service` on `listener` until `stop` is set, then finishes the
/// requests it has read and returns.
pub fn serve(listener: TcpListener, service: Service, options: Options, stop: Arc<AtomicBool>) -> Result<()> {
    listener.set_nonblocking(true)?;
    let (queue, work) = std::sync::mpsc::sync_channel::<Work>(options.queue);
    let work = Arc::new(Mutex::new(work));
    let (service, waiting) = (Arc::new(service), Arc::new(AtomicUsize::new(0)));
    let workers: Vec<_> = (0..options.workers)
        .map(|_| {
            let (service, waiting, work) = (Arc::clone(&service), Arc::clone(&waiting), Arc::clone(&work));
            std::thread::spawn(move || run_worker(&service, &waiting, &work))
        })
        .collect();
    let shared = Arc::new(Shared { service, metrics: Metrics::default(), queue, waiting, options });
    let open = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::SeqCst) {
        if !wait_for_connection(&listener, Duration::from_millis(100)) {
            continue;
        }
        let Ok((stream, _)) = listener.accept() else { continue };
        let _ = stream.set_nonblocking(false);
        if open.load(Ordering::SeqCst) >= shared.options.connections {
            shared.metrics.count("busy");
            let busy = Response::error(503, "too many connections; retry later").with_header("Retry-After", "1".into());
            let _ = http::write_response(&mut { stream }, &busy);
            continue;
        }
        open.fetch_add(1, Ordering::SeqCst);
        let (shared, open) = (Arc::clone(&shared), Arc::clone(&open));
        std::thread::spawn(move || {
            handle_connection(&shared, stream);
            open.fetch_sub(1, Ordering::SeqCst);
        });
    }
    drop(listener);
    while open.load(Ordering::SeqCst) > 0 {
        std::thread::sleep(Duration::from_millis(20));
    }
    // The last sender goes with `shared`: workers see the queue close.
    drop(shared);
    for worker in workers {
        let _ = worker.join();
    }
    Ok(())
}

/// Whether a connection waits on `listener`, within `timeout`: accepting
/// as soon as one arrives, while looking at the stop flag now and then.
fn wait_for_connection(listener: &TcpListener, timeout: Duration) -> bool {
    use std::os::fd::AsRawFd;
    let mut poll = libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let millis = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd, for a descriptor `listener` keeps open.
    let ready = unsafe { libc::poll(&mut poll, 1, millis) };
    ready > 0 && poll.revents & libc::POLLIN != 0
}

fn run_worker(service: &Service, waiting: &AtomicUsize, work: &Mutex<Receiver<Work>>) {
    loop {
        let next = work.lock().map(|queue| queue.recv());
        let Ok(Ok(item)) = next else { return };
        waiting.fetch_sub(1, Ordering::SeqCst);
        if item.abandoned.load(Ordering::SeqCst) {
            continue;
        }
        let response = route_model(service, &item.request);
        let _ = item.reply.send(response);
    }
}

fn handle_connection(shared: &Arc<Shared>, mut stream: TcpStream) {
    let start = Instant::now();
    let options = &shared.options;
    let response = match http::read_request(&mut stream, options.max_body, options.read_timeout) {
        Ok(request) => respond(shared, request),
        Err(error) => match error.status {
            Some(status) => Response::error(status, &error.reason),
            None => return,
        },
    };
    shared.metrics.record(response.status, start.elapsed());
    let _ = stream.set_write_timeout(Some(options.read_timeout));
    let _ = http::write_response(&mut stream, &response);
    // A refused body may still be arriving: closing on unread bytes would
    // reset the connection, and the client could lose the answer. Read a
    // little of it, for a little while, first.
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let _ = std::io::copy(&mut std::io::Read::take(&mut stream, options.max_body as u64), &mut std::io::sink());
}

fn respond(shared: &Arc<Shared>, request: Request) -> Response {
    let options = &shared.options;
    if let Some(token) = &options.token
        && request.path != "/healthz"
        && request.header("authorization") != Some(&format!("Bearer {token}"))
    {
        return Response::error(401, "a bearer token is needed (Authorization: Bearer TOKEN)")
            .with_header("WWW-Authenticate", "Bearer".into());
    }
    match (request.method.as_str(), request.path.as_str()) {
        ("GET", "/") => Response::new(200, "text/html; charset=utf-8", PAGE.as_bytes().to_vec()),
        ("GET", "/healthz") => Response::json(200, &serde_json::json!({ "status": "ok" })),
        ("GET", "/v1/models") => shared.service.models(),
        ("GET", "/metrics") => {
            let waiting = shared.waiting.load(Ordering::SeqCst);
            Response::new(200, "text/plain; version=0.0.4", shared.metrics.render(waiting).into_bytes())
        }
        ("POST", "/v1/segment" | "/v1/attention") => queue_for_worker(shared, request),
        (_, "/" | "/healthz" | "/v1/models" | "/metrics" | "/v1/segment" | "/v1/attention") => {
            Response::error(405, &format!("{} is not allowed on {}", request.method, request.path))
        }
        _ => Response::error(404, &format!("no endpoint {}", request.path)),
    }
}

fn queue_for_worker(shared: &Arc<Shared>, request: Request) -> Response {
    let (reply, answer) = std::sync::mpsc::sync_channel(1);
    let abandoned = Arc::new(AtomicBool::new(false));
    shared.waiting.fetch_add(1, Ordering::SeqCst);
    let work = Work { request, reply, abandoned: Arc::clone(&abandoned) };
    match shared.queue.try_send(work) {
        Ok(()) => {}
        Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
            shared.waiting.fetch_sub(1, Ordering::SeqCst);
            return Response::error(503, "the queue is full; retry later").with_header("Retry-After", "1".into());
        }
    }
    match answer.recv_timeout(shared.options.timeout) {
        Ok(response) => response,
        Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
            abandoned.store(true, Ordering::SeqCst);
            let seconds = shared.options.timeout.as_secs_f64();
            Response::error(504, &format!("not done within the {seconds} s timeout"))
        }
    }
}

fn route_model(service: &Service, request: &Request) -> Response {
    let answer = match request.path.as_str() {
        "/v1/segment" => service.segment(request),
        _ => service.attention(request),
    };
    answer.unwrap_or_else(|refused| Response::error(refused.status, &refused.message))
}
