//! A minimal HTTP/1.1 client over one keep-alive TCP connection.
//!
//! It does what the vector runner and the load generator need and nothing else: plain HTTP,
//! one request at a time, `Content-Length` or chunked response bodies, and a transparent
//! reconnect when the server has closed an idle connection. The write buffer, read buffer and
//! the [`Response`] passed to [`Client::send_into`] are reused, so a steady stream of requests
//! allocates nothing once the buffers have grown.

use std::{io, net::SocketAddr, ops::Range};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Largest response head (status line and headers) accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Largest response body accepted.
const MAX_BODY: usize = 64 * 1024 * 1024;
const READ_CHUNK: usize = 16 * 1024;

/// One HTTP response. Header names and values borrow from the stored head.
#[derive(Debug, Default, Clone)]
pub struct Response {
    pub status: u16,
    head: Vec<u8>,
    headers: Vec<(Range<usize>, Range<usize>)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The first header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// All headers in the order the server sent them.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.headers.iter().map(|(n, v)| {
            (
                std::str::from_utf8(&self.head[n.clone()]).unwrap_or(""),
                std::str::from_utf8(&self.head[v.clone()]).unwrap_or(""),
            )
        })
    }

    /// The body as UTF-8 (lossy).
    pub fn text(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.body)
    }

    fn clear(&mut self) {
        self.status = 0;
        self.head.clear();
        self.headers.clear();
        self.body.clear();
    }

    fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }
}

/// A keep-alive connection to one server; it connects lazily and reconnects when needed.
#[derive(Debug)]
pub struct Client {
    addr: SocketAddr,
    host: String,
    stream: Option<TcpStream>,
    /// Whether the current connection has already carried a response.
    reused: bool,
    wbuf: Vec<u8>,
    rbuf: Vec<u8>,
    /// Start of the unconsumed bytes in `rbuf`.
    rpos: usize,
    connects: u64,
}

/// How a failed exchange ended: before the server said anything, or after.
enum Failure {
    NothingReceived(io::Error),
    Other(io::Error),
}

impl Client {
    pub fn new(addr: SocketAddr) -> Client {
        Client {
            addr,
            host: addr.to_string(),
            stream: None,
            reused: false,
            wbuf: Vec::with_capacity(1024),
            rbuf: Vec::with_capacity(READ_CHUNK),
            rpos: 0,
            connects: 0,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many TCP connections this client has opened so far.
    pub fn connects(&self) -> u64 {
        self.connects
    }

    /// Sends a request and returns a new response.
    pub async fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<Response> {
        let mut response = Response::default();
        self.send_into(method, path, headers, body, &mut response)
            .await?;
        Ok(response)
    }

    /// Sends a request and reads the response into `response`, reusing its buffers.
    ///
    /// `Host` and `Content-Length` are added; `headers` must not contain them. When a reused
    /// connection turns out to have been closed by the server before any response byte
    /// arrived, the request is sent once more on a fresh connection.
    pub async fn send_into(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        response: &mut Response,
    ) -> io::Result<()> {
        self.encode(method, path, headers, body);
        let head_only = method.eq_ignore_ascii_case("HEAD");
        let retryable = self.stream.is_some() && self.reused;
        match self.exchange(head_only, response).await {
            Ok(()) => Ok(()),
            Err(Failure::NothingReceived(_)) if retryable => {
                self.disconnect();
                self.exchange(head_only, response)
                    .await
                    .map_err(|f| match f {
                        Failure::NothingReceived(e) | Failure::Other(e) => e,
                    })
            }
            Err(Failure::NothingReceived(e) | Failure::Other(e)) => Err(e),
        }
    }

    /// Drops the connection; the next request opens a new one.
    pub fn disconnect(&mut self) {
        self.stream = None;
        self.reused = false;
        self.rbuf.clear();
        self.rpos = 0;
    }

    fn encode(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) {
        let w = &mut self.wbuf;
        w.clear();
        for part in [method, " ", path, " HTTP/1.1\r\nHost: ", &self.host, "\r\n"] {
            w.extend_from_slice(part.as_bytes());
        }
        for (name, value) in headers {
            w.extend_from_slice(name.as_bytes());
            w.extend_from_slice(b": ");
            w.extend_from_slice(value.as_bytes());
            w.extend_from_slice(b"\r\n");
        }
        let needs_length = !body.is_empty()
            || ["POST", "PUT", "PATCH"]
                .iter()
                .any(|m| m.eq_ignore_ascii_case(method));
        if needs_length {
            w.extend_from_slice(b"Content-Length: ");
            push_decimal(w, body.len());
            w.extend_from_slice(b"\r\n");
        }
        w.extend_from_slice(b"\r\n");
        w.extend_from_slice(body);
    }

    async fn exchange(&mut self, head_only: bool, response: &mut Response) -> Result<(), Failure> {
        if self.stream.is_none() {
            let stream = TcpStream::connect(self.addr)
                .await
                .map_err(Failure::Other)?;
            stream.set_nodelay(true).map_err(Failure::Other)?;
            self.stream = Some(stream);
            self.reused = false;
            self.rbuf.clear();
            self.rpos = 0;
            self.connects += 1;
        }
        let result = self.write_and_read(head_only, response).await;
        match &result {
            Ok(keep_alive) if *keep_alive => self.reused = true,
            _ => self.disconnect(),
        }
        result.map(|_| ())
    }

    /// Returns whether the connection may carry another request.
    async fn write_and_read(
        &mut self,
        head_only: bool,
        response: &mut Response,
    ) -> Result<bool, Failure> {
        let Some(stream) = self.stream.as_mut() else {
            return Err(Failure::Other(io::ErrorKind::NotConnected.into()));
        };
        // A server may answer before reading the whole request (413) and close; its answer is
        // then still worth reading.
        let write_error = stream.write_all(&self.wbuf).await.err();
        response.clear();
        let mut conn = Conn {
            stream,
            buf: &mut self.rbuf,
            pos: &mut self.rpos,
            received: false,
        };
        let fail = |conn_received: bool, e: io::Error| {
            if conn_received {
                Failure::Other(e)
            } else {
                Failure::NothingReceived(e)
            }
        };
        // Skip interim 1xx responses.
        let version_1_0 = loop {
            let v10 = match conn.read_head(response).await {
                Ok(v) => v,
                Err(e) => return Err(fail(conn.received, write_error.unwrap_or(e))),
            };
            if !(100..200).contains(&response.status) || response.status == 101 {
                break v10;
            }
            response.clear();
        };
        let close = write_error.is_some()
            || if version_1_0 {
                !response.has_token("connection", "keep-alive")
            } else {
                response.has_token("connection", "close")
            };
        let no_body = head_only || matches!(response.status, 101 | 204 | 304);
        if no_body {
            return Ok(!close);
        }
        if response.has_token("transfer-encoding", "chunked") {
            conn.read_chunked(&mut response.body)
                .await
                .map_err(Failure::Other)?;
            return Ok(!close);
        }
        if let Some(len) = response.header("content-length") {
            let len: usize = len
                .trim()
                .parse()
                .map_err(|_| Failure::Other(invalid(format!("bad Content-Length `{len}`"))))?;
            if len > MAX_BODY {
                return Err(Failure::Other(invalid("response body too large")));
            }
            conn.read_exact_into(len, &mut response.body)
                .await
                .map_err(Failure::Other)?;
            return Ok(!close);
        }
        conn.read_to_end_into(&mut response.body)
            .await
            .map_err(Failure::Other)?;
        Ok(false)
    }
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn push_decimal(out: &mut Vec<u8>, mut n: usize) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// The read side of one exchange: buffered bytes plus the socket.
struct Conn<'a> {
    stream: &'a mut TcpStream,
    buf: &'a mut Vec<u8>,
    pos: &'a mut usize,
    received: bool,
}

impl Conn<'_> {
    fn available(&self) -> &[u8] {
        &self.buf[*self.pos..]
    }

    /// Reads more bytes from the socket; EOF is an error (the message is not complete).
    async fn fill(&mut self) -> io::Result<()> {
        if *self.pos > 0 && *self.pos == self.buf.len() {
            self.buf.clear();
            *self.pos = 0;
        } else if *self.pos > READ_CHUNK {
            self.buf.drain(..*self.pos);
            *self.pos = 0;
        }
        let start = self.buf.len();
        self.buf.resize(start + READ_CHUNK, 0);
        let n = match self.stream.read(&mut self.buf[start..]).await {
            Ok(n) => n,
            Err(e) => {
                self.buf.truncate(start);
                return Err(e);
            }
        };
        self.buf.truncate(start + n);
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before the response was complete",
            ));
        }
        self.received = true;
        Ok(())
    }

    /// Parses the status line and headers; returns whether the response is HTTP/1.0.
    async fn read_head(&mut self, response: &mut Response) -> io::Result<bool> {
        let end = loop {
            if let Some(i) = find(self.available(), b"\r\n\r\n") {
                break i;
            }
            if self.available().len() > MAX_HEAD {
                return Err(invalid("response head too large"));
            }
            self.fill().await?;
        };
        let start = *self.pos;
        response
            .head
            .extend_from_slice(&self.buf[start..start + end]);
        *self.pos += end + 4;

        let head = &response.head;
        let mut lines = LineSpans::new(head);
        let status_line = lines.next().ok_or_else(|| invalid("empty response head"))?;
        let status_line = &head[status_line];
        let mut parts = status_line.splitn(3, |b| *b == b' ');
        let version = parts.next().unwrap_or_default();
        if !version.starts_with(b"HTTP/1.") {
            return Err(invalid(format!(
                "not an HTTP/1.x response: {}",
                String::from_utf8_lossy(status_line)
            )));
        }
        let code = parts.next().unwrap_or_default();
        response.status = std::str::from_utf8(code)
            .ok()
            .and_then(|c| c.parse().ok())
            .filter(|c| (100..1000).contains(c))
            .ok_or_else(|| invalid("bad status code"))?;
        for line in lines {
            if line.is_empty() {
                continue;
            }
            let colon = head[line.clone()]
                .iter()
                .position(|b| *b == b':')
                .ok_or_else(|| invalid("header line without a colon"))?;
            let name = line.start..line.start + colon;
            let mut value = line.start + colon + 1..line.end;
            while value.start < value.end && head[value.start].is_ascii_whitespace() {
                value.start += 1;
            }
            while value.end > value.start && head[value.end - 1].is_ascii_whitespace() {
                value.end -= 1;
            }
            response.headers.push((name, value));
        }
        Ok(version == b"HTTP/1.0")
    }

    async fn read_exact_into(&mut self, len: usize, out: &mut Vec<u8>) -> io::Result<()> {
        let mut left = len;
        while left > 0 {
            if self.available().is_empty() {
                self.fill().await?;
            }
            let take = left.min(self.available().len());
            out.extend_from_slice(&self.available()[..take]);
            *self.pos += take;
            left -= take;
        }
        Ok(())
    }

    async fn read_line(&mut self) -> io::Result<Range<usize>> {
        loop {
            if let Some(i) = find(self.available(), b"\r\n") {
                let start = *self.pos;
                *self.pos += i + 2;
                return Ok(start..start + i);
            }
            if self.available().len() > MAX_HEAD {
                return Err(invalid("chunk line too long"));
            }
            self.fill().await?;
        }
    }

    async fn read_chunked(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        loop {
            let line = self.read_line().await?;
            let line = &self.buf[line];
            let size_part = line.split(|b| *b == b';').next().unwrap_or_default();
            let size = std::str::from_utf8(size_part)
                .ok()
                .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
                .ok_or_else(|| invalid("bad chunk size"))?;
            if size == 0 {
                // Trailers, up to the empty line.
                loop {
                    let trailer = self.read_line().await?;
                    if trailer.is_empty() {
                        return Ok(());
                    }
                }
            }
            if out.len() + size > MAX_BODY {
                return Err(invalid("response body too large"));
            }
            self.read_exact_into(size, out).await?;
            let crlf = self.read_line().await?;
            if !crlf.is_empty() {
                return Err(invalid("chunk not followed by CRLF"));
            }
        }
    }

    async fn read_to_end_into(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        out.extend_from_slice(self.available());
        *self.pos = self.buf.len();
        loop {
            match self.fill().await {
                Ok(()) => {
                    if out.len() + self.available().len() > MAX_BODY {
                        return Err(invalid("response body too large"));
                    }
                    out.extend_from_slice(self.available());
                    *self.pos = self.buf.len();
                }
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Iterates the CRLF-separated lines of a head as byte ranges.
struct LineSpans<'a> {
    head: &'a [u8],
    at: usize,
}

impl<'a> LineSpans<'a> {
    fn new(head: &'a [u8]) -> Self {
        LineSpans { head, at: 0 }
    }
}

impl Iterator for LineSpans<'_> {
    type Item = Range<usize>;

    fn next(&mut self) -> Option<Range<usize>> {
        if self.at > self.head.len() {
            return None;
        }
        let rest = &self.head[self.at..];
        let len = find(rest, b"\r\n").unwrap_or(rest.len());
        let span = self.at..self.at + len;
        self.at += len + 2;
        Some(span)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A server that answers each request on a connection with the next canned response,
    /// then closes the connection after `per_conn` requests.
    async fn canned(responses: Vec<&'static str>, per_conn: usize) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut next = 0;
            while let Ok((mut sock, _)) = listener.accept().await {
                let mut buf = Vec::new();
                let mut served = 0;
                while served < per_conn && next < responses.len() {
                    let mut chunk = [0u8; 4096];
                    let n = sock.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    // Requests in these tests carry a body announced by Content-Length.
                    while let Some(end) = find(&buf, b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                        if buf.len() < end + 4 + len {
                            break;
                        }
                        buf.drain(..end + 4 + len);
                        sock.write_all(responses[next].as_bytes()).await.unwrap();
                        next += 1;
                        served += 1;
                    }
                }
            }
        });
        addr
    }

    #[tokio::test]
    async fn reads_content_length_and_chunked_bodies_on_one_connection() {
        let addr = canned(
            vec![
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"a\":true}\n",
                "HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n4;x=y\r\nabcd\r\n3\r\nefg\r\n0\r\nX-Trailer: 1\r\n\r\n",
                "HTTP/1.1 204 No Content\r\n\r\n",
            ],
            10,
        )
        .await;
        let mut client = Client::new(addr);
        let r = client
            .send("POST", "/x", &[("A", "b")], b"{}")
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.text(), "{\"a\":true}\n");
        let r = client.send("GET", "/y", &[], b"").await.unwrap();
        assert_eq!(r.status, 404);
        assert_eq!(r.text(), "abcdefg");
        let mut reused = Response::default();
        client
            .send_into("DELETE", "/z", &[], b"", &mut reused)
            .await
            .unwrap();
        assert_eq!(reused.status, 204);
        assert!(reused.body.is_empty());
        assert_eq!(client.connects(), 1);
    }

    #[tokio::test]
    async fn reconnects_when_the_server_closed_an_idle_connection() {
        let addr = canned(
            vec![
                "HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1",
                "HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n2",
                "HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n3",
            ],
            1,
        )
        .await;
        let mut client = Client::new(addr);
        for expected in ["1", "2", "3"] {
            let r = client.send("POST", "/", &[], b"x").await.unwrap();
            assert_eq!(r.text(), expected);
        }
        assert_eq!(client.connects(), 3);
    }

    #[tokio::test]
    async fn connection_close_and_close_delimited_bodies() {
        let addr = canned(
            vec![
                "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
                "HTTP/1.0 200 OK\r\n\r\nuntil eof",
            ],
            1,
        )
        .await;
        let mut client = Client::new(addr);
        assert_eq!(
            client.send("GET", "/", &[], b"").await.unwrap().text(),
            "ok"
        );
        assert_eq!(
            client.send("GET", "/", &[], b"").await.unwrap().text(),
            "until eof"
        );
        assert_eq!(client.connects(), 2);
    }

    #[test]
    fn decimal_lengths() {
        for n in [0usize, 7, 10, 1234567] {
            let mut out = Vec::new();
            push_decimal(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
        }
    }
}
