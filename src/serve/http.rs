//! HTTP/1.1 on a TCP stream, as much as a service of a few endpoints needs:
//! one request per connection, a body by `Content-Length` or chunked, and a
//! bound on every part: the head's size, the body's size, and the time the
//! whole request may take to arrive (a slow client cannot hold a thread).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Request lines and headers past this are refused.
const MAX_HEAD_BYTES: usize = 16 << 10;

pub struct Request {
    pub method: String,
    pub path: String,
    pub query: Vec<(String, String)>,
    headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    /// The value of header `name` (any case), if given.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The value of query parameter `name`, if given.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// Why a request could not be read, and the status that says so; `None`
/// when the client went away and nobody is left to answer.
#[derive(Debug)]
pub struct ReadError {
    pub status: Option<u16>,
    pub reason: String,
}

impl ReadError {
    fn new(status: u16, reason: impl Into<String>) -> Self {
        Self { status: Some(status), reason: reason.into() }
    }
}

pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn new(status: u16, content_type: &'static str, body: Vec<u8>) -> Self {
        Self { status, content_type, headers: Vec::new(), body }
    }

    pub fn json(status: u16, value: &serde_json::Value) -> Self {
        Self::new(status, "application/json", format!("{value}\n").into_bytes())
    }

    pub fn error(status: u16, message: &str) -> Self {
        Self::json(status, &serde_json::json!({ "error": message }))
    }

    pub fn with_header(mut self, name: &'static str, value: String) -> Self {
        self.headers.push((name, value));
        self
    }
}

/// Reads one request from `stream`: its head within [`MAX_HEAD_BYTES`], a
/// body of at most `max_body` bytes, all of it within `time`.
pub fn read_request(stream: &mut TcpStream, max_body: usize, time: Duration) -> Result<Request, ReadError> {
    let deadline = Instant::now() + time;
    let mut buffer = Vec::with_capacity(4096);
    let head_end = loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        if buffer.len() > MAX_HEAD_BYTES {
            return Err(ReadError::new(431, format!("request head over {MAX_HEAD_BYTES} bytes")));
        }
        read_some(stream, &mut buffer, deadline)?;
    };
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Request::new(&mut headers);
    match parsed.parse(&buffer[..head_end]) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) | Err(_) => return Err(ReadError::new(400, "not an HTTP request")),
    }
    let method = parsed.method.unwrap_or_default().to_string();
    let target = parsed.path.unwrap_or_default();
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let headers: Vec<(String, String)> = parsed
        .headers
        .iter()
        .map(|h| (h.name.to_string(), String::from_utf8_lossy(h.value).trim().to_string()))
        .collect();
    let mut request =
        Request { method, path: percent_decode(path), query: parse_query(query), headers, body: Vec::new() };
    let rest = buffer[head_end..].to_vec();
    // A client that asks first (curl does, past 1 KiB) waits for this before
    // it sends the body; one over the limit is refused below without it.
    let body_allowed =
        request.header("content-length").and_then(|l| l.parse::<usize>().ok()).is_none_or(|l| l <= max_body);
    if request.header("expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue")) && body_allowed {
        stream
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .map_err(|e| ReadError { status: None, reason: e.to_string() })?;
    }
    request.body = if request.header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        read_chunked(stream, rest, max_body, deadline)?
    } else if let Some(length) = request.header("content-length") {
        let length: usize = length.parse().map_err(|_| ReadError::new(400, "a Content-Length that is not a number"))?;
        if length > max_body {
            return Err(ReadError::new(413, format!("body of {length} bytes: the limit is {max_body}")));
        }
        let mut body = rest;
        while body.len() < length {
            read_some(stream, &mut body, deadline)?;
        }
        body.truncate(length);
        body
    } else {
        Vec::new()
    };
    Ok(request)
}

/// Appends what arrives next, waiting at most until `deadline`.
fn read_some(stream: &mut TcpStream, buffer: &mut Vec<u8>, deadline: Instant) -> Result<(), ReadError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(ReadError::new(408, "the request took too long to arrive"));
    }
    stream.set_read_timeout(Some(left)).map_err(|e| ReadError { status: None, reason: e.to_string() })?;
    let mut chunk = [0u8; 16 << 10];
    match stream.read(&mut chunk) {
        Ok(0) => Err(ReadError { status: None, reason: "the client closed the connection".into() }),
        Ok(n) => {
            buffer.extend_from_slice(&chunk[..n]);
            Ok(())
        }
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
            Err(ReadError::new(408, "the request took too long to arrive"))
        }
        Err(e) => Err(ReadError { status: None, reason: e.to_string() }),
    }
}

/// A chunked body: hexadecimal sizes, each chunk, then a chunk of 0.
fn read_chunked(
    stream: &mut TcpStream,
    mut data: Vec<u8>,
    max_body: usize,
    deadline: Instant,
) -> Result<Vec<u8>, ReadError> {
    let mut body = Vec::new();
    loop {
        let line_end = loop {
            if let Some(end) = data.windows(2).position(|w| w == b"\r\n") {
                break end;
            }
            if data.len() > 1024 {
                return Err(ReadError::new(400, "a chunk size line over 1 KiB"));
            }
            read_some(stream, &mut data, deadline)?;
        };
        let line = String::from_utf8_lossy(&data[..line_end]);
        let size = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size, 16).map_err(|_| ReadError::new(400, "a chunk size that is not hex"))?;
        if size > max_body.saturating_sub(body.len()) {
            return Err(ReadError::new(413, format!("body over the limit of {max_body} bytes")));
        }
        let need = (line_end + 4).saturating_add(size);
        while data.len() < need {
            read_some(stream, &mut data, deadline)?;
        }
        if size == 0 {
            return Ok(body);
        }
        body.extend_from_slice(&data[line_end + 2..line_end + 2 + size]);
        data.drain(..need);
    }
}

pub fn write_response(stream: &mut TcpStream, response: &Response) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        response.status,
        reason(response.status),
        response.content_type,
        response.body.len()
    );
    for (name, value) in &response.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(&response.body)?;
    stream.flush()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Payload Too Large",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Content",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Internal Server Error",
    }
}

fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(name), percent_decode(value))
        })
        .collect()
}

/// `%XX` escapes and `+` for a space, as forms send them.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(high), Some(low)) => {
                    out.push(high << 4 | low);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The part named `field` of a `multipart/form-data` body.
pub fn multipart_field<'a>(body: &'a [u8], content_type: &str, field: &str) -> Option<&'a [u8]> {
    let boundary = content_type.split(';').find_map(|p| p.trim().strip_prefix("boundary="))?.trim_matches('"');
    let delimiter = format!("--{boundary}");
    let delimiter = delimiter.as_bytes();
    let mut parts = Vec::new();
    let mut at = 0;
    while let Some(found) = find(&body[at..], delimiter) {
        parts.push(at + found);
        at += found + delimiter.len();
    }
    parts.windows(2).find_map(|w| {
        let part = &body[w[0] + delimiter.len()..w[1]];
        let part = part.strip_prefix(b"\r\n")?;
        let head_end = find(part, b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&part[..head_end]).to_ascii_lowercase();
        let named = head.lines().any(|line| {
            line.starts_with("content-disposition:")
                && (line.contains(&format!("name=\"{field}\"")) || line.contains(&format!("name={field};")))
        });
        let content = &part[head_end + 4..];
        named.then(|| content.strip_suffix(b"\r\n").unwrap_or(content))
    })
}

fn hex(digit: u8) -> Option<u8> {
    (digit as char).to_digit(16).map(|d| d as u8)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_split_and_decoded() {
        let query = parse_query("output=overlay&threshold=0.4&name=a%20b+c&flag");
        assert_eq!(query[0], ("output".into(), "overlay".into()));
        assert_eq!(query[2], ("name".into(), "a b c".into()));
        assert_eq!(query[3], ("flag".into(), String::new()));
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%4"), "%4");
    }

    #[test]
    fn a_multipart_field_is_found_by_name() {
        let body = b"--xyz\r\nContent-Disposition: form-data; name=\"other\"\r\n\r\nno\r\n\
            --xyz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\n\
            Content-Type: image/jpeg\r\n\r\n\xff\xd8bytes\r\n--xyz--\r\n";
        let field = multipart_field(body, "multipart/form-data; boundary=xyz", "file");
        assert_eq!(field, Some(&b"\xff\xd8bytes"[..]));
        assert_eq!(multipart_field(body, "multipart/form-data; boundary=xyz", "missing"), None);
    }
}
