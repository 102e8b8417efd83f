//! Test support: a fault-injecting HTTP proxy between the code under test and
//! the real S3 server (DESIGN §6).
//!
//! ```ignore
//! let proxy = Proxy::start(&s3.endpoint);            // 127.0.0.1:<ephemeral>
//! proxy.set(Rule::new(Fault::Cut).probability(0.1)); // 10 % of ranged GETs
//! sb.ok(&["restore", "--endpoint-url", &proxy.url(), ...]);
//! assert!(proxy.faults() > 0);
//! ```
//!
//! It runs on a thread of its own with its own tokio runtime, so sync tests and
//! child processes (the binary under test, a FUSE daemon) can use it alike, and it
//! shuts down when dropped (open connections, stalled ones included, are closed).
//! It listens on loopback only and speaks just enough HTTP/1.1 for the AWS SDK:
//! requests and responses framed by `Content-Length` or chunked encoding,
//! keep-alive towards the client; each request gets a fresh upstream connection.
//! Requests are forwarded byte for byte (SigV4 signatures stay valid: the `Host`
//! header is the proxy's, which is what the client signed).
//!
//! Rules ([`Rule`]) apply by default to GETs with a `Range` header (object reads);
//! the first rule that fires on a request decides its fault. A hook
//! ([`Proxy::set_hook`]) runs before each request is forwarded — to change the
//! object mid-read, write to the real server directly (not through the proxy).

#![allow(dead_code)]

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader,
};
use tokio::net::{TcpListener, TcpStream};

/// What to do to a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Wait this long, then forward normally.
    Latency(Duration),
    /// Send the response headers and half the body, then reset the connection.
    Cut,
    /// Send the response headers (whose Content-Length says N) and 3/4 of the
    /// body, then close the connection cleanly.
    Truncate,
    /// Send the response headers and half the body, then nothing, ever.
    StallMidBody,
    /// Answer 500 InternalError without asking the server.
    Status500,
    /// Answer 503 SlowDown (S3's XML error) without asking the server.
    SlowDown,
    /// Answer 403 AccessDenied without asking the server (credentials
    /// without permission on the bucket).
    AccessDenied,
    /// Read the request, never answer (the connection stays open).
    Stall,
    /// Forward the request head and half its body upstream, then reset both
    /// connections: an upload cut in the middle (a multipart part, a PUT).
    CutRequest,
}

/// When a rule fires, among the requests it matches.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum When {
    Always,
    /// With this probability (the proxy's seeded RNG).
    Probability(f64),
    /// On the Nth, 2Nth, … matching request.
    EveryNth(u64),
    /// On the first N matching requests.
    FirstN(u64),
    /// On every matching request after the first N.
    AfterN(u64),
}

/// Which requests a rule looks at.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Requests {
    /// GETs with a Range header (object reads). The default.
    RangedGets,
    /// Every GET (also key pointers read whole, listings).
    Gets,
    /// Everything (HEAD, PUT, …) too.
    All,
    /// Requests of this method whose target (path and query) contains this
    /// text: `Requests::Matching("PUT", "partNumber=")` (multipart parts),
    /// `Requests::Matching("POST", "uploadId=")` (CompleteMultipartUpload),
    /// `Requests::Matching("PUT", "/keys/")` (key pointers).
    Matching(&'static str, &'static str),
}

/// Multipart upload parts.
pub const UPLOAD_PARTS: Requests = Requests::Matching("PUT", "partNumber=");
/// CompleteMultipartUpload.
pub const COMPLETE_MULTIPART: Requests = Requests::Matching("POST", "uploadId=");
/// Writes of key pointers (`PREFIX/keys/…`).
pub const POINTER_PUTS: Requests = Requests::Matching("PUT", "/keys/");

/// One fault rule: `Rule::new(Fault::SlowDown).probability(0.2)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub fault: Fault,
    pub when: When,
    pub requests: Requests,
}

impl Rule {
    /// `fault` on every ranged GET.
    pub fn new(fault: Fault) -> Self {
        Rule {
            fault,
            when: When::Always,
            requests: Requests::RangedGets,
        }
    }

    pub fn probability(mut self, p: f64) -> Self {
        self.when = When::Probability(p);
        self
    }

    pub fn every(mut self, n: u64) -> Self {
        assert!(n > 0);
        self.when = When::EveryNth(n);
        self
    }

    pub fn first(mut self, n: u64) -> Self {
        self.when = When::FirstN(n);
        self
    }

    pub fn after(mut self, n: u64) -> Self {
        self.when = When::AfterN(n);
        self
    }

    pub fn on(mut self, requests: Requests) -> Self {
        self.requests = requests;
        self
    }
}

/// A request as the hook sees it.
#[derive(Debug, Clone)]
pub struct RequestInfo {
    /// 0 for the first request the proxy saw, then 1, 2, …
    pub seq: u64,
    pub method: String,
    /// Path and query, as sent (`/bucket/key?x-id=GetObject`).
    pub target: String,
    /// The Range header, if any.
    pub range: Option<String>,
    /// The Authorization header (SigV4: its credential scope names the region).
    pub authorization: Option<String>,
}

impl RequestInfo {
    pub fn is_ranged_get(&self) -> bool {
        self.method == "GET" && self.range.is_some()
    }

    /// The region of the SigV4 credential scope (`Credential=AK/date/REGION/s3/…`).
    pub fn signed_region(&self) -> Option<&str> {
        let auth = self.authorization.as_deref()?;
        let scope = auth.split("Credential=").nth(1)?;
        scope.split('/').nth(2)
    }

    pub fn matches(&self, requests: Requests) -> bool {
        match requests {
            Requests::RangedGets => self.is_ranged_get(),
            Requests::Gets => self.method == "GET",
            Requests::All => true,
            Requests::Matching(method, text) => self.method == method && self.target.contains(text),
        }
    }
}

/// A request and the status it was answered with (by the server, or by a
/// fault: 500, 503; 0 when the connection was cut, stalled or reset before a
/// status reached the client).
#[derive(Debug, Clone)]
pub struct Answered {
    pub request: RequestInfo,
    pub status: u16,
}

/// Runs before a request is forwarded (on a blocking thread: it may block, e.g.
/// to overwrite the object on the real server). The request waits for it.
pub type Hook = Arc<dyn Fn(&RequestInfo) + Send + Sync>;

/// The running proxy; stops when dropped.
pub struct Proxy {
    addr: SocketAddr,
    upstream: String,
    shared: Arc<Shared>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct Shared {
    /// `host:port` of the real server.
    upstream: String,
    rules: Mutex<Vec<(Rule, u64)>>,
    rng: Mutex<u64>,
    hook: Mutex<Option<Hook>>,
    answered: Mutex<Vec<Answered>>,
    requests: AtomicU64,
    ranged_gets: AtomicU64,
    faults: AtomicU64,
}

impl Proxy {
    /// A proxy to `upstream` (`http://host:port`), with a fixed RNG seed.
    pub fn start(upstream: &str) -> Proxy {
        Self::with_seed(upstream, 0x5eed)
    }

    pub fn with_seed(upstream: &str, seed: u64) -> Proxy {
        let host = upstream
            .strip_prefix("http://")
            .unwrap_or_else(|| panic!("the proxy speaks plain http, not {upstream}"))
            .trim_end_matches('/')
            .to_string();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            upstream: host,
            rules: Mutex::new(Vec::new()),
            rng: Mutex::new(seed),
            hook: Mutex::new(None),
            answered: Mutex::new(Vec::new()),
            requests: AtomicU64::new(0),
            ranged_gets: AtomicU64::new(0),
            faults: AtomicU64::new(0),
        });
        let (tx, rx) = tokio::sync::oneshot::channel();
        let shared2 = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("fault-proxy-{}", addr.port()))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let listener = TcpListener::from_std(listener).unwrap();
                    tokio::select! {
                        _ = rx => {}
                        _ = accept_loop(listener, shared2) => {}
                    }
                });
                // Drops every connection task (stalled ones too); a hook still
                // running on a blocking thread is not waited for long.
                rt.shutdown_timeout(Duration::from_millis(200));
            })
            .unwrap();
        Proxy {
            addr,
            upstream: upstream.to_string(),
            shared,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT`, for `--endpoint-url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The real server behind it.
    pub fn upstream(&self) -> &str {
        &self.upstream
    }

    /// Replaces every rule with `rule`.
    pub fn set(&self, rule: Rule) {
        *self.shared.rules.lock().unwrap() = vec![(rule, 0)];
    }

    /// Adds `rule` after the existing ones.
    pub fn add(&self, rule: Rule) {
        self.shared.rules.lock().unwrap().push((rule, 0));
    }

    /// No more faults: everything is forwarded as is.
    pub fn clear(&self) {
        self.shared.rules.lock().unwrap().clear();
    }

    pub fn set_hook(&self, hook: impl Fn(&RequestInfo) + Send + Sync + 'static) {
        *self.shared.hook.lock().unwrap() = Some(Arc::new(hook));
    }

    pub fn clear_hook(&self) {
        *self.shared.hook.lock().unwrap() = None;
    }

    /// Runs `change(n)` before the `n`th ranged GET (1, 2, …) is forwarded —
    /// the request waits for it: the one "change the object mid-read" hook.
    pub fn on_ranged_get(&self, change: impl Fn(u64) + Send + Sync + 'static) {
        let gets = AtomicU64::new(0);
        self.set_hook(move |req| {
            if req.is_ranged_get() {
                change(gets.fetch_add(1, Ordering::SeqCst) + 1);
            }
        });
    }

    /// Runs `change()` once, before the `n`th ranged GET is forwarded.
    pub fn change_on_nth_ranged_get(&self, n: u64, change: impl Fn() + Send + Sync + 'static) {
        assert!(n > 0, "ranged GETs count from 1");
        self.on_ranged_get(move |i| {
            if i == n {
                change()
            }
        });
    }

    /// Every request answered (or cut) so far, in the order they ended.
    pub fn answered(&self) -> Vec<Answered> {
        self.watcher().answered()
    }

    /// Waits until `pred` holds for a request answered so far; false after `timeout`.
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&Answered) -> bool) -> bool {
        self.watcher().wait_for(timeout, pred)
    }

    /// Waits until at least `n` faults were injected; false after `timeout`.
    pub fn wait_faults(&self, n: u64, timeout: Duration) -> bool {
        self.watcher().wait_faults(n, timeout)
    }

    /// A handle on the proxy's record that a hook can hold.
    pub fn watcher(&self) -> Watcher {
        Watcher(self.shared.clone())
    }

    /// Requests seen, of any kind.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// Ranged GETs seen.
    pub fn ranged_gets(&self) -> u64 {
        self.shared.ranged_gets.load(Ordering::SeqCst)
    }

    /// Faults injected (a body fault on a response without a body to break is
    /// not injected, so not counted).
    pub fn faults(&self) -> u64 {
        self.shared.faults.load(Ordering::SeqCst)
    }
}

/// What the proxy has seen, for a hook or another thread to wait on.
#[derive(Clone)]
pub struct Watcher(Arc<Shared>);

impl Watcher {
    pub fn answered(&self) -> Vec<Answered> {
        self.0.answered.lock().unwrap().clone()
    }

    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&Answered) -> bool) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if self.0.answered.lock().unwrap().iter().any(&pred) {
                return true;
            }
            if std::time::Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn wait_faults(&self, n: u64, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while self.0.faults.load(Ordering::SeqCst) < n {
            if std::time::Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Shared {
    /// splitmix64, in [0, 1).
    fn random(&self) -> f64 {
        let mut state = self.rng.lock().unwrap();
        *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    /// The fault the rules pick for `req`, if any.
    fn pick(&self, req: &RequestInfo) -> Option<Fault> {
        let mut rules = self.rules.lock().unwrap();
        for (rule, matched) in rules.iter_mut() {
            if !req.matches(rule.requests) {
                continue;
            }
            *matched += 1;
            let fires = match rule.when {
                When::Always => true,
                When::Probability(p) => self.random() < p,
                When::EveryNth(n) => *matched % n == 0,
                When::FirstN(n) => *matched <= n,
                When::AfterN(n) => *matched > n,
            };
            if fires {
                return Some(rule.fault.clone());
            }
        }
        None
    }

    fn injected(&self) {
        self.faults.fetch_add(1, Ordering::SeqCst);
    }

    fn answer(&self, request: &RequestInfo, status: u16) {
        self.answered.lock().unwrap().push(Answered {
            request: request.clone(),
            status,
        });
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _ = serve(conn, shared).await;
        });
    }
}

/// A parsed message head (request or response), with its raw bytes.
struct Head {
    raw: Vec<u8>,
    /// Request: method, target, version. Response: version, status, reason.
    start: Vec<String>,
    /// Lower-cased names.
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn has_token(&self, name: &str, token: &str) -> bool {
        self.header(name)
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    }

    fn content_length(&self) -> Option<u64> {
        self.header("content-length")?.trim().parse().ok()
    }
}

/// Reads a message head; `None` on a clean end of stream before it.
async fn read_head<R: AsyncBufRead + Unpin>(r: &mut R) -> io::Result<Option<Head>> {
    let mut raw = Vec::new();
    loop {
        let before = raw.len();
        if r.read_until(b'\n', &mut raw).await? == 0 {
            if raw.is_empty() {
                return Ok(None);
            }
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let line = &raw[before..];
        if line == b"\r\n" || line == b"\n" {
            if before == 0 {
                // Stray empty line between messages.
                raw.clear();
                continue;
            }
            break;
        }
        if raw.len() > 256 << 10 {
            return Err(io::Error::other("message head too large"));
        }
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let mut lines = text.lines();
    let start = lines
        .next()
        .unwrap_or_default()
        .splitn(3, ' ')
        .map(str::to_string)
        .collect();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(Some(Head {
        raw,
        start,
        headers,
    }))
}

/// Copies a chunked body (chunks, last chunk, trailers) verbatim.
async fn copy_chunked<R, W>(r: &mut R, w: &mut W) -> io::Result<()>
where
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let mut line = Vec::new();
        if r.read_until(b'\n', &mut line).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        w.write_all(&line).await?;
        let text = String::from_utf8_lossy(&line);
        let size = text.trim().split(';').next().unwrap_or_default().trim();
        let size = u64::from_str_radix(size, 16)
            .map_err(|_| io::Error::other(format!("bad chunk size line {text:?}")))?;
        if size == 0 {
            // Trailers up to an empty line.
            loop {
                let mut line = Vec::new();
                if r.read_until(b'\n', &mut line).await? == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                w.write_all(&line).await?;
                if line == b"\r\n" || line == b"\n" {
                    return Ok(());
                }
            }
        }
        // The chunk and its CRLF.
        copy_exact(r, w, size + 2).await?;
    }
}

async fn copy_exact<R, W>(r: &mut R, w: &mut W, n: u64) -> io::Result<()>
where
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let copied = tokio::io::copy_buf(&mut r.take(n), w).await?;
    if copied < n {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// How a response's body ends.
enum Framing {
    None,
    Length(u64),
    Chunked,
    UntilClose,
}

fn s3_error(status: u16, reason: &str, code: &str, message: &str) -> Vec<u8> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code>\
         <Message>{message}</Message><RequestId>fault-proxy</RequestId></Error>"
    );
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n\
         Content-Length: {}\r\nx-amz-request-id: fault-proxy\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Serves one client connection, request after request.
async fn serve(conn: TcpStream, shared: Arc<Shared>) -> io::Result<()> {
    let _ = conn.set_nodelay(true);
    let mut client = BufReader::with_capacity(64 << 10, conn);
    loop {
        let Some(head) = read_head(&mut client).await? else {
            return Ok(());
        };
        let method = head.start.first().cloned().unwrap_or_default();
        let mut body = Vec::new();
        if head.has_token("transfer-encoding", "chunked") {
            copy_chunked(&mut client, &mut body).await?;
        } else if let Some(n) = head.content_length() {
            copy_exact(&mut client, &mut body, n).await?;
        }
        let info = RequestInfo {
            seq: shared.requests.fetch_add(1, Ordering::SeqCst),
            method: method.clone(),
            target: head.start.get(1).cloned().unwrap_or_default(),
            range: head.header("range").map(str::to_string),
            authorization: head.header("authorization").map(str::to_string),
        };
        if info.is_ranged_get() {
            shared.ranged_gets.fetch_add(1, Ordering::SeqCst);
        }
        let hook = shared.hook.lock().unwrap().clone();
        if let Some(hook) = hook {
            let info = info.clone();
            tokio::task::spawn_blocking(move || hook(&info))
                .await
                .map_err(io::Error::other)?;
        }
        let fault = shared.pick(&info);
        let client_closes = head.has_token("connection", "close");
        match &fault {
            Some(Fault::Latency(d)) => {
                shared.injected();
                tokio::time::sleep(*d).await;
            }
            Some(Fault::Status500) => {
                shared.injected();
                let r = s3_error(
                    500,
                    "Internal Server Error",
                    "InternalError",
                    "We encountered an internal error. Please try again.",
                );
                client.get_mut().write_all(&r).await?;
                shared.answer(&info, 500);
                if client_closes {
                    return Ok(());
                }
                continue;
            }
            Some(Fault::SlowDown) => {
                shared.injected();
                let r = s3_error(
                    503,
                    "Slow Down",
                    "SlowDown",
                    "Please reduce your request rate.",
                );
                client.get_mut().write_all(&r).await?;
                shared.answer(&info, 503);
                if client_closes {
                    return Ok(());
                }
                continue;
            }
            Some(Fault::AccessDenied) => {
                shared.injected();
                let r = s3_error(403, "Forbidden", "AccessDenied", "Access Denied");
                client.get_mut().write_all(&r).await?;
                shared.answer(&info, 403);
                if client_closes {
                    return Ok(());
                }
                continue;
            }
            Some(Fault::Stall) => {
                shared.injected();
                shared.answer(&info, 0);
                std::future::pending::<()>().await;
            }
            Some(Fault::CutRequest) => {
                shared.injected();
                if let Ok(mut up) = TcpStream::connect(&shared.upstream).await {
                    let _ = up.write_all(&head.raw).await;
                    let _ = up.write_all(&body[..body.len() / 2]).await;
                    let _ = up.set_zero_linger();
                }
                shared.answer(&info, 0);
                client.get_mut().set_zero_linger()?;
                return Ok(());
            }
            _ => {}
        }
        let keep = forward(&shared, &info, &head, &body, client.get_mut(), fault).await?;
        if !keep || client_closes {
            return Ok(());
        }
    }
}

/// Forwards one request upstream and its response back, applying a body fault.
/// Returns whether the client connection can carry another request.
async fn forward(
    shared: &Shared,
    info: &RequestInfo,
    head: &Head,
    body: &[u8],
    client: &mut TcpStream,
    fault: Option<Fault>,
) -> io::Result<bool> {
    let mut up = TcpStream::connect(&shared.upstream).await?;
    let _ = up.set_nodelay(true);
    up.write_all(&head.raw).await?;
    up.write_all(body).await?;
    let mut up = BufReader::with_capacity(64 << 10, up);
    let (resp, status) = loop {
        let resp = read_head(&mut up)
            .await?
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        let status: u16 = resp
            .start
            .get(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| io::Error::other("bad status line"))?;
        if (100..200).contains(&status) {
            // Interim (100 Continue): pass on, then the real response.
            client.write_all(&resp.raw).await?;
            continue;
        }
        break (resp, status);
    };
    let method = info.method.as_str();
    let framing = if method == "HEAD" || status == 204 || status == 304 {
        Framing::None
    } else if resp.has_token("transfer-encoding", "chunked") {
        Framing::Chunked
    } else if let Some(n) = resp.content_length() {
        Framing::Length(n)
    } else {
        Framing::UntilClose
    };
    // Body faults need a successful response with a body to break.
    if let (Some(fault), Framing::Length(n), true) =
        (&fault, &framing, (200..300).contains(&status))
    {
        let n = *n;
        let sent = match fault {
            Fault::Cut | Fault::StallMidBody if n >= 2 => Some(n / 2),
            Fault::Truncate if n >= 2 => Some(n - (n / 4).max(1)),
            _ => None,
        };
        if let Some(sent) = sent {
            shared.injected();
            shared.answer(info, 0);
            client.write_all(&resp.raw).await?;
            copy_exact(&mut up, client, sent).await?;
            client.flush().await?;
            match fault {
                Fault::Cut => {
                    // Reset rather than close: the client sees a broken connection.
                    client.set_zero_linger()?;
                }
                Fault::StallMidBody => std::future::pending::<()>().await,
                _ => {}
            }
            return Ok(false);
        }
    }
    client.write_all(&resp.raw).await?;
    match framing {
        Framing::None => {}
        Framing::Length(n) => copy_exact(&mut up, client, n).await?,
        Framing::Chunked => copy_chunked(&mut up, client).await?,
        Framing::UntilClose => {
            tokio::io::copy_buf(&mut up, client).await?;
            shared.answer(info, status);
            return Ok(false);
        }
    }
    client.flush().await?;
    shared.answer(info, status);
    Ok(!resp.has_token("connection", "close"))
}
