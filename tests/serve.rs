//! `segattn serve` as programs use it: a real server on a loopback port,
//! every endpoint, every error status, concurrent requests, a full queue, a
//! slow client, a timeout, and SIGTERM while requests are in flight.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

mod common;
use common::{fixture, s, sample};

/// A server on a free loopback port, stopped when dropped.
struct Server {
    child: Child,
    port: u16,
}

impl Server {
    fn start(args: &[&str]) -> Self {
        Self::start_with(args, true)
    }

    fn start_with(args: &[&str], test_model: bool) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_segattn"));
        command.args(["serve", "--port", "0"]).args(args);
        if test_model {
            command.args(["--weights", s(&fixture("dino_vit")), "--size", "64"]);
        }
        let mut child =
            command.env_remove("SEGATTN_WEIGHTS").env_remove("SEGATTN_MODEL").stderr(Stdio::piped()).spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stderr.as_mut().unwrap()).read_line(&mut line).unwrap();
        let port = line.trim().rsplit(':').next().and_then(|p| p.parse().ok());
        let port = port.unwrap_or_else(|| panic!("no port in {line:?}"));
        Server { child, port }
    }

    fn connect(&self) -> TcpStream {
        TcpStream::connect(("127.0.0.1", self.port)).unwrap()
    }

    /// Sends `method path` with `headers` and `body`; returns the status,
    /// the response head and the body.
    fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
        let mut stream = self.connect();
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n", body.len());
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).unwrap();
        // The server may answer (413) before it has read all of a large body.
        let _ = stream.write_all(body);
        read_reply(&mut stream)
    }

    fn post(&self, path: &str, body: &[u8]) -> Reply {
        self.request("POST", path, &[], body)
    }

    fn post_json(&self, path: &str, body: &[u8]) -> serde_json::Value {
        let reply = self.request("POST", path, &[("Accept", "application/json")], body);
        assert_eq!(reply.status, 200, "{}", reply.text());
        serde_json::from_slice(&reply.body).unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Reply {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Reply {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn error(&self) -> String {
        let value: serde_json::Value = serde_json::from_slice(&self.body).expect("a JSON error");
        value["error"].as_str().expect("an error message").to_string()
    }

    fn png(&self) -> image::DynamicImage {
        assert_eq!(self.status, 200, "{}", self.text());
        assert!(self.head.contains("Content-Type: image/png"), "{}", self.head);
        image::load_from_memory(&self.body).unwrap()
    }
}

fn read_reply(stream: &mut TcpStream) -> Reply {
    let mut bytes = Vec::new();
    let _ = stream.read_to_end(&mut bytes);
    let end = bytes.windows(4).position(|w| w == b"\r\n\r\n").expect("a response head") + 4;
    let head = String::from_utf8_lossy(&bytes[..end]).into_owned();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    Reply { status, head, body: bytes[end..].to_vec() }
}

fn cat() -> Vec<u8> {
    std::fs::read(sample("cat.jpg")).unwrap()
}

#[test]
fn every_endpoint_answers() {
    let server = Server::start(&[]);
    let health = server.request("GET", "/healthz", &[], b"");
    assert_eq!((health.status, health.text().trim()), (200, r#"{"status":"ok"}"#));
    let models: serde_json::Value =
        serde_json::from_slice(&server.request("GET", "/v1/models", &[], b"").body).unwrap();
    assert_eq!((models["layers"].as_u64(), models["patch_size"].as_u64()), (Some(3), Some(8)));
    let page = server.request("GET", "/", &[], b"");
    assert!(page.status == 200 && page.text().contains("/v1/attention"), "{}", page.head);

    let photo = image::load_from_memory(&cat()).unwrap();
    for output in ["mask", "soft", "overlay", "cutout"] {
        let picture = server.post(&format!("/v1/segment?output={output}"), &cat()).png();
        assert_eq!((picture.width(), picture.height()), (photo.width(), photo.height()), "{output}");
    }
    // The mask is what `segattn run` writes for the same photo and model.
    let dir = tempfile::tempdir().unwrap();
    let written = dir.path().join("mask.png");
    let run = common::segattn_with(&["run", s(&sample("cat.jpg")), "--out", s(&written)], &fixture("dino_vit"), 64)
        .output()
        .unwrap();
    assert!(run.status.success());
    let served = server.post("/v1/segment", &cat()).png();
    assert_eq!(served.to_luma8().into_raw(), image::open(&written).unwrap().to_luma8().into_raw());

    let record = server.post_json("/v1/segment?threshold=0.3&refine=true", &cat());
    assert_eq!((record["width"].as_u64(), record["head"].as_str()), (Some(451), Some("attn")));
    assert!(record["mask_area"].as_f64().is_some_and(|a| a > 0.0 && a < 1.0), "{record}");

    // A form upload, as the page and `curl -F` send it.
    let mut form =
        b"--b0undary\r\nContent-Disposition: form-data; name=\"file\"; filename=\"cat.jpg\"\r\n\r\n".to_vec();
    form.extend(cat());
    form.extend(b"\r\n--b0undary--\r\n");
    let reply =
        server.request("POST", "/v1/segment", &[("Content-Type", "multipart/form-data; boundary=b0undary")], &form);
    assert_eq!(reply.png().to_luma8().into_raw(), served.to_luma8().into_raw());

    let heat = server.post("/v1/attention?layer=-1&head=1&colormap=viridis", &cat()).png();
    assert_eq!((heat.width(), heat.height()), (photo.width(), photo.height()));
    assert_eq!(server.post("/v1/attention?rollout=true&raw=true", &cat()).status, 200);
    let cls = server.post_json("/v1/attention", &cat());
    let cells = (cls["grid"]["rows"].as_u64().unwrap() * cls["grid"]["cols"].as_u64().unwrap()) as usize;
    assert_eq!(cls["heads"].as_array().unwrap().len(), 4);
    assert_eq!(cls["mean"].as_array().unwrap().len(), cells);
    // Each patch attends in its own way; the class token in another.
    let first = server.post_json("/v1/attention?patch=0", &cat());
    let last = server.post_json(&format!("/v1/attention?patch={}", cells - 1), &cat());
    assert_eq!(first["mean"].as_array().unwrap().len(), cells);
    assert_ne!(first["mean"], last["mean"]);
    assert_ne!(first["mean"], cls["mean"]);
    // Rows come from the keys kept for the photo, size and layer asked for,
    // never another's.
    assert_eq!(server.post_json("/v1/attention?patch=0", &cat()), first);
    let coffee = server.post_json("/v1/attention?patch=0", &std::fs::read(sample("coffee.jpg")).unwrap());
    assert_eq!(coffee["width"], 600);
    assert_ne!(coffee["mean"], first["mean"]);
    let larger = server.post_json("/v1/attention?patch=0&size=96", &cat());
    assert_ne!(larger["grid"], first["grid"]);
    let other_layer = server.post_json("/v1/attention?patch=0&layer=0", &cat());
    assert_ne!(other_layer["mean"], first["mean"]);

    let metrics = server.request("GET", "/metrics", &[], b"").text();
    assert!(metrics.contains("segattn_requests_total{status=\"200\"}"), "{metrics}");
    assert!(metrics.contains("segattn_request_seconds_bucket{le=\"+Inf\"}"), "{metrics}");
    assert!(metrics.contains("segattn_queue_depth 0"), "{metrics}");
}

#[test]
fn every_fault_has_its_status() {
    let server = Server::start(&["--max-body", "200000", "--max-pixels", "200000"]);
    let jpeg = cat();
    let cases: Vec<(Reply, u16, &str)> = vec![
        (server.post("/v1/segment", &jpeg[..jpeg.len() / 2]), 400, "damaged JPEG"),
        (server.post("/v1/segment", b""), 400, "no photo"),
        (server.post("/v1/segment", b"plain text, not a photo"), 415, "not a supported image"),
        (server.post("/v1/segment", &vec![0u8; 300_000]), 413, "the limit is 200000"),
        (server.post("/v1/segment", &std::fs::read(sample("astronaut.jpg")).unwrap()), 413, "over the limit of 200000"),
        (server.post("/v1/segment?output=gif", &jpeg), 422, "output must be"),
        (server.post("/v1/segment?threshold=nan", &jpeg), 422, "threshold must be"),
        (server.post("/v1/segment?size=9000", &jpeg), 422, "size must be"),
        (server.post("/v1/segment?head=decoder", &jpeg), 422, "head decoder: this model carries none"),
        (server.post("/v1/attention?layer=7", &jpeg), 422, "layer 7 out of range"),
        (server.post("/v1/attention?head=4", &jpeg), 422, "head must be mean or 0 to 3"),
        (server.post("/v1/attention?patch=100000", &jpeg), 422, "patch must be below"),
        (server.post("/v1/attention?rollout=true&patch=3", &jpeg), 422, "takes no layer, head or patch"),
        (server.post("/v1/attention?rollout=true&layer=1", &jpeg), 422, "takes no layer, head or patch"),
        (server.request("GET", "/v1/segment", &[], b""), 405, "not allowed"),
        (server.request("GET", "/etc/passwd", &[], b""), 404, "no endpoint"),
    ];
    for (reply, status, message) in cases {
        assert_eq!(reply.status, status, "{message}: {}", reply.text());
        assert!(reply.head.contains("Content-Type: application/json"), "{}", reply.head);
        assert!(reply.error().contains(message), "{message}: {}", reply.error());
        // The command line's flags mean nothing here.
        assert!(!reply.error().contains("--"), "{}", reply.error());
    }
}

/// A body sent in chunks, as clients that stream do, with the chunks'
/// sizes counted against the limit.
#[test]
fn chunked_bodies_are_read_and_bounded() {
    let server = Server::start(&["--max-body", "100000"]);
    let chunked = |body: &[u8]| {
        let mut stream = server.connect();
        let head = "POST /v1/segment HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
        stream.write_all(head.as_bytes()).unwrap();
        for chunk in body.chunks(7000) {
            let _ = stream.write_all(format!("{:x};ext=1\r\n", chunk.len()).as_bytes());
            let _ = stream.write_all(chunk);
            let _ = stream.write_all(b"\r\n");
        }
        let _ = stream.write_all(b"0\r\n\r\n");
        read_reply(&mut stream)
    };
    let whole = server.post("/v1/segment", &cat()).png().to_luma8().into_raw();
    assert_eq!(chunked(&cat()).png().to_luma8().into_raw(), whole);
    let over = chunked(&vec![0u8; 150_000]);
    assert_eq!(over.status, 413, "{}", over.text());
}

/// curl asks before sending a body past 1 KiB, and waits for the answer.
#[test]
fn a_client_that_asks_before_sending_is_told_to_go_on() {
    let server = Server::start(&["--max-body", "100000"]);
    let photo = cat();
    let mut stream = server.connect();
    let head = format!("POST /v1/segment HTTP/1.1\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n", photo.len());
    stream.write_all(head.as_bytes()).unwrap();
    let mut interim = [0u8; 25];
    stream.read_exact(&mut interim).unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    stream.write_all(&photo).unwrap();
    assert_eq!(read_reply(&mut stream).status, 200);
    // Too large: refused at once, with no invitation to send it.
    let mut stream = server.connect();
    stream.write_all(b"POST /v1/segment HTTP/1.1\r\nContent-Length: 200000\r\nExpect: 100-continue\r\n\r\n").unwrap();
    assert_eq!(read_reply(&mut stream).status, 413);
}

#[test]
fn a_token_guards_everything_but_health() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret\n").unwrap();
    let server = Server::start(&["--token", s(&token)]);
    assert_eq!(server.request("GET", "/healthz", &[], b"").status, 200);
    let refused = server.post("/v1/segment", &cat());
    assert_eq!(refused.status, 401);
    assert!(refused.head.contains("WWW-Authenticate: Bearer"));
    assert_eq!(server.request("GET", "/v1/models", &[("Authorization", "Bearer wrong")], b"").status, 401);
    let reply = server.request("POST", "/v1/segment", &[("Authorization", "Bearer s3cret")], &cat());
    assert_eq!(reply.status, 200);
}

#[test]
fn concurrent_requests_are_all_answered() {
    let server = Server::start(&["--jobs", "2"]);
    let photo = cat();
    let replies: Vec<Reply> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8).map(|_| scope.spawn(|| server.post("/v1/segment", &photo))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let first = replies[0].png().to_luma8().into_raw();
    for reply in &replies {
        assert_eq!(reply.png().to_luma8().into_raw(), first);
    }
}

/// A request that keeps a worker busy for a few seconds: rollout over
/// thousands of patches.
const SLOW: &str = "/v1/attention?size=384&rollout=true";

#[test]
fn a_full_queue_says_503_and_a_late_answer_504() {
    let server = Server::start(&["--jobs", "1", "--queue", "1", "--timeout", "1"]);
    let photo = cat();
    let replies: Vec<Reply> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..5)
            .map(|i| {
                let photo = &photo;
                let server = &server;
                scope.spawn(move || {
                    std::thread::sleep(Duration::from_millis(50 * i));
                    server.post(SLOW, photo)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let statuses: Vec<u16> = replies.iter().map(|r| r.status).collect();
    assert!(statuses.iter().all(|s| [503, 504].contains(s)), "{statuses:?}");
    let busy = replies.iter().find(|r| r.status == 503).expect("one refused: one worker, a queue of one");
    assert!(busy.head.contains("Retry-After: 1") && busy.error().contains("queue is full"), "{}", busy.head);
    let late = replies.iter().find(|r| r.status == 504).expect("the slow one timed out");
    assert!(late.error().contains("timeout"), "{}", late.error());
    // Light endpoints answer while the workers are busy.
    assert_eq!(server.request("GET", "/healthz", &[], b"").status, 200);
}

#[test]
fn a_slow_client_is_cut_off() {
    let server = Server::start(&["--read-timeout", "1"]);
    let mut stream = server.connect();
    stream.write_all(b"POST /v1/segment HTTP/1.1\r\nContent-Length: 1000\r\n\r\nonly a little").unwrap();
    let reply = read_reply(&mut stream);
    assert_eq!(reply.status, 408, "{}", reply.text());
    // Headers that never end are cut off too.
    let mut stream = server.connect();
    stream.write_all(b"GET /healthz HTTP/1.1\r\nX-Slow: ").unwrap();
    assert_eq!(read_reply(&mut stream).status, 408);
}

#[test]
fn sigterm_finishes_the_requests_in_flight() {
    let mut server = Server::start(&["--jobs", "1"]);
    let photo = cat();
    let reply = std::thread::scope(|scope| {
        let in_flight = scope.spawn(|| server.post(SLOW, &photo));
        std::thread::sleep(Duration::from_millis(300));
        let status = Command::new("kill").args(["-TERM", &server.child.id().to_string()]).status().unwrap();
        assert!(status.success());
        in_flight.join().unwrap()
    });
    assert_eq!(reply.status, 200, "{}", reply.text());
    let exit = server.child.wait().unwrap();
    assert_eq!(exit.code(), Some(0));
    assert!(TcpStream::connect(("127.0.0.1", server.port)).is_err(), "still listening after SIGTERM");
}

#[test]
fn the_builtin_model_is_served() {
    let server = Server::start_with(&[], false);
    let models: serde_json::Value =
        serde_json::from_slice(&server.request("GET", "/v1/models", &[], b"").body).unwrap();
    assert_eq!(models["model"], "segattn-s16");
    assert!(models["segmentation_heads"].as_array().unwrap().iter().any(|h| h == "decoder"));
    let record = server.post_json("/v1/segment", &cat());
    assert_eq!(record["head"], "decoder");
}
