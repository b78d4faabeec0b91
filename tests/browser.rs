//! The page of `segattn serve` in headless Chromium, driven over WebDriver
//! (Debian's `chromium` and `chromium-driver`): upload a photo, wait for
//! the overlay, click a patch, and check that the heat map changes to what
//! `/v1/attention?patch=` gives for that patch. Skipped where chromedriver
//! is not installed, unless SEGATTN_REQUIRE_BROWSER is set (CI sets it).
//! SEGATTN_SCREENSHOT=FILE keeps a screenshot of the page (the README's).

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod common;
use common::sample;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A WebDriver session's commands.
struct Browser {
    base: String,
}

impl Browser {
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}{path}", self.base);
        let request = ureq::request(method, &url).set("Content-Type", "application/json");
        let response = match body {
            Some(body) => request.send_string(&body.to_string()),
            None => request.call(),
        };
        let text = match response {
            Ok(r) => r.into_string().unwrap(),
            Err(ureq::Error::Status(code, r)) => panic!("{method} {path}: {code} {}", r.into_string().unwrap()),
            Err(e) => panic!("{method} {path}: {e}"),
        };
        serde_json::from_str::<Value>(&text).unwrap()["value"].take()
    }

    fn script(&self, source: &str) -> Value {
        self.call("POST", "/execute/sync", Some(json!({ "script": source, "args": [] })))
    }

    /// Waits until `condition` (a script's return value) is true.
    fn wait_for(&self, condition: &str, what: &str) {
        let start = Instant::now();
        while self.script(&format!("return Boolean({condition});")) != json!(true) {
            let status = self.script("return document.getElementById('status').textContent;");
            assert!(start.elapsed() < Duration::from_secs(90), "no {what} after 90 s; the page says {status}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn decode_base64(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    };
    let digits: Vec<u8> = text.bytes().filter(|&c| c != b'=' && !c.is_ascii_whitespace()).map(value).collect();
    digits
        .chunks(4)
        .flat_map(|chunk| {
            let bits = chunk.iter().enumerate().fold(0u32, |acc, (i, &d)| acc | u32::from(d) << (18 - 6 * i));
            bits.to_be_bytes()[1..chunk.len()].to_vec()
        })
        .collect()
}

#[test]
fn the_page_shows_the_mask_and_what_a_clicked_patch_attends_to() {
    if Command::new("chromedriver").arg("--version").output().is_err() {
        assert!(std::env::var_os("SEGATTN_REQUIRE_BROWSER").is_none(), "chromedriver is not installed");
        eprintln!("skipped: no chromedriver (apt-get install chromium chromium-driver)");
        return;
    }
    let mut server = Command::new(env!("CARGO_BIN_EXE_segattn"))
        .args(["serve", "--port", "0"])
        .env_remove("SEGATTN_WEIGHTS")
        .env_remove("SEGATTN_MODEL")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(server.stderr.as_mut().unwrap()).read_line(&mut line).unwrap();
    let _server = Killed(server);
    let page = format!("{}/", line.trim().rsplit(' ').next().unwrap());

    let driver_port = free_port();
    let driver = Command::new("chromedriver")
        .arg(format!("--port={driver_port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _driver = Killed(driver);
    let driver_url = format!("http://127.0.0.1:{driver_port}");
    let start = Instant::now();
    while ureq::get(&format!("{driver_url}/status")).call().is_err() {
        assert!(start.elapsed() < Duration::from_secs(30), "chromedriver did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let args =
        ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1500,1100"];
    let capabilities = json!({ "capabilities": { "alwaysMatch": {
        "browserName": "chrome",
        "goog:chromeOptions": { "binary": "/usr/bin/chromium", "args": args },
    }}});
    let session = Browser { base: driver_url.clone() }.call("POST", "/session", Some(capabilities));
    let browser = Browser { base: format!("{driver_url}/session/{}", session["sessionId"].as_str().unwrap()) };

    browser.call("POST", "/url", Some(json!({ "url": page })));
    browser.wait_for("document.getElementById('layer').options.length > 0", "model description");
    let input = browser.call("POST", "/element", Some(json!({ "using": "css selector", "value": "#file" })));
    let input = input.as_object().unwrap().values().next().unwrap().as_str().unwrap().to_string();
    let photo = sample("cat.jpg");
    browser.call("POST", &format!("/element/{input}/value"), Some(json!({ "text": photo.to_str().unwrap() })));
    browser.wait_for("document.getElementById('overlay').naturalWidth === 451 && maps !== null", "overlay");
    let class_token_view = browser.script("return document.getElementById('view').toDataURL();");

    // Click at 30 % across and 40 % down the attention view.
    let rect = browser.script(
        "const r = document.getElementById('view').getBoundingClientRect(); return [r.left, r.top, r.width, r.height];",
    );
    let [left, top, width, height] = [0, 1, 2, 3].map(|i| rect[i].as_f64().unwrap());
    let (x, y) = (0.3, 0.4);
    let pointer = json!({ "actions": [{ "type": "pointer", "id": "mouse", "parameters": { "pointerType": "mouse" }, "actions": [
        { "type": "pointerMove", "origin": "viewport", "x": (left + x * width) as i64, "y": (top + y * height) as i64 },
        { "type": "pointerDown", "button": 0 },
        { "type": "pointerUp", "button": 0 },
    ]}]});
    browser.call("POST", "/actions", Some(pointer));
    browser.wait_for("patch !== null && maps !== null && maps.patch === patch", "patch map");
    let state = browser.script("return [patch, maps.grid.rows, maps.grid.cols, maps.mean];");
    let patch = state[0].as_u64().unwrap();
    let (rows, cols) = (state[1].as_u64().unwrap(), state[2].as_u64().unwrap());
    let (row, col) = (patch / cols, patch % cols);
    assert!((col as f64 + 0.5 - x * cols as f64).abs() <= 1.0, "column {col} of {cols} for x {x}");
    assert!((row as f64 + 0.5 - y * rows as f64).abs() <= 1.0, "row {row} of {rows} for y {y}");

    // The page shows what the API says that patch attends to...
    let bytes = std::fs::read(&photo).unwrap();
    let api: Value = serde_json::from_str(
        &ureq::post(&format!("{page}v1/attention?patch={patch}"))
            .set("Accept", "application/json")
            .send_bytes(&bytes)
            .unwrap()
            .into_string()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(state[3], api["mean"]);
    // ...and its picture changed.
    let patch_view = browser.script("return document.getElementById('view').toDataURL();");
    assert_ne!(patch_view, class_token_view);

    let screenshot = browser.call("GET", "/screenshot", None);
    let png = decode_base64(screenshot.as_str().unwrap());
    let shot = image::load_from_memory(&png).unwrap();
    assert!(shot.width() >= 1000, "{}x{}", shot.width(), shot.height());
    let kept = std::env::var_os("SEGATTN_SCREENSHOT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("serve-page.png"));
    std::fs::write(kept, png).unwrap();
    browser.call("DELETE", "", None);
}
