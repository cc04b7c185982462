//! HTTP/1.1 server on a Unix socket: hyper on a current-thread tokio runtime owned by one API thread.
//!
//! - The socket is created mode 0600 with no window where it is reachable with looser permissions: it
//!   is bound under a temporary name, chmod-ed, then hard-linked into place (which, unlike rename,
//!   never replaces an existing file). A stale socket file (nothing
//!   accepting on it) is replaced; a live one or a non-socket file is an error.
//! - Each call into the [`ApiHandler`] runs on tokio's blocking pool, so a slow handler delays only its
//!   own request, and after [`ServerOptions::handler_timeout`] the client gets a 503 instead of waiting.
//! - Bodies are capped: a `Content-Length` above [`ServerOptions::max_body_bytes`] is answered 413
//!   before any byte of the body is read; a chunked body is cut off at the cap.
//! - Nothing a client sends can panic the server; a panicking handler yields a 500.
//! - Responses are written the way Cloud Hypervisor's client library reads them (see [`crate::wire`]):
//!   `HTTP/1.1 <code> \r\n` with an empty reason phrase, title-cased header names
//!   (`Content-Length: `), ASCII-only JSON bodies, and errors as a JSON array of messages.
//! - A request needs no `Content-Type` (CH's client sends none): bodies are read as JSON whatever
//!   it says.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener as StdUnixListener, UnixStream as StdUnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{watch, Notify, Semaphore};

use crate::error::ApiError;
use crate::handler::ApiHandler;
use crate::router::{self, Endpoint, Reply};

/// Errors starting or stopping the API server.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    #[error("api socket path {path:?} has no file name or parent directory")]
    BadSocketPath { path: PathBuf },
    #[error("api socket {path:?} is in use by a running server: stop it or choose another path")]
    SocketInUse { path: PathBuf },
    #[error("api socket path {path:?} exists and is not a socket: refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("cannot inspect api socket path {path:?}")]
    InspectSocket {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove stale api socket {path:?}")]
    RemoveStaleSocket {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot bind api socket {path:?}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot set mode 0600 on api socket {path:?}")]
    SetMode {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot link api socket into place at {path:?}")]
    Place {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot build the api runtime")]
    Runtime(#[source] io::Error),
    #[error("cannot spawn the api thread")]
    SpawnThread(#[source] io::Error),
    #[error("the api thread panicked")]
    ThreadPanicked,
}

/// Limits of the server. [`ServerOptions::default`] suits the VMM.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Largest accepted request body (413 above it).
    pub max_body_bytes: usize,
    /// How long a client waits for a handler before it gets a 503.
    pub handler_timeout: Duration,
    /// How long a client may take to send the request head before the connection is closed.
    pub header_read_timeout: Duration,
    /// Concurrent connections. A connection beyond them takes the place of the one that has gone
    /// longest without a request in flight (idle, or still sending its head); when every one is
    /// being answered, it is closed at once.
    pub max_connections: usize,
    /// Threads that run handler calls (tokio's blocking pool size).
    pub handler_threads: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            max_body_bytes: 64 * 1024,
            handler_timeout: Duration::from_secs(30),
            header_read_timeout: Duration::from_secs(10),
            max_connections: 64,
            handler_threads: 4,
        }
    }
}

/// A running API server. Stop it with [`ApiServer::shutdown`]; dropping it stops it too.
#[derive(Debug)]
pub struct ApiServer {
    path: PathBuf,
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Serves `handler` on a new Unix socket at `path` with default options.
    pub fn start(path: &Path, handler: Arc<dyn ApiHandler>) -> Result<ApiServer, ApiServerError> {
        ApiServer::start_with(path, handler, ServerOptions::default())
    }

    /// Serves `handler` on a new Unix socket at `path`. Returns once the socket accepts connections.
    pub fn start_with(
        path: &Path,
        handler: Arc<dyn ApiHandler>,
        options: ServerOptions,
    ) -> Result<ApiServer, ApiServerError> {
        let listener = bind_private(path)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .max_blocking_threads(options.handler_threads.max(1))
            .thread_name("tern-api-handler")
            .build()
            .map_err(ApiServerError::Runtime)?;
        let (stop, stopped) = watch::channel(false);
        let thread = std::thread::Builder::new()
            .name("tern-api".into())
            .spawn(move || {
                runtime.block_on(serve(listener, handler, options, stopped));
                // Handler calls still running are not waited for: they finish on their own threads.
                runtime.shutdown_background();
            })
            .map_err(ApiServerError::SpawnThread)?;
        Ok(ApiServer {
            path: path.to_owned(),
            stop,
            thread: Some(thread),
        })
    }

    /// The socket path this server listens on.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting, closes open connections, waits for the API thread and removes the socket
    /// file. Requests being handled are abandoned (their handler calls still run to their end). Do not
    /// call this from inside a handler: it waits for the thread that runs the handler's request.
    pub fn shutdown(mut self) -> Result<(), ApiServerError> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Result<(), ApiServerError> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        // Send fails only if the API thread already ended, which is fine: it is about to be joined.
        let _ = self.stop.send(true);
        let joined = thread.join();
        match std::fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => log::warn!("cannot remove api socket {:?}: {e}", self.path),
        }
        joined.map_err(|_| ApiServerError::ThreadPanicked)
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Err(e) = self.stop_and_join() {
            log::error!("api server shutdown: {}", crate::error::error_chain(&e));
        }
    }
}

/// Binds a listening socket at `path` that is never reachable with a mode looser than 0600.
fn bind_private(path: &Path) -> Result<StdUnixListener, ApiServerError> {
    static STARTS: AtomicU64 = AtomicU64::new(0);
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(ApiServerError::BadSocketPath {
            path: path.to_owned(),
        });
    };
    remove_stale_socket(path)?;
    let mut tmp_name = name.to_owned();
    tmp_name.push(format!(
        ".{}-{}.tmp",
        std::process::id(),
        STARTS.fetch_add(1, Ordering::Relaxed)
    ));
    let tmp = dir.join(tmp_name);
    // A leftover from a crashed process that had this pid; nothing can be using it.
    let _ = std::fs::remove_file(&tmp);
    let listener = StdUnixListener::bind(&tmp).map_err(|source| ApiServerError::Bind {
        path: tmp.clone(),
        source,
    })?;
    // chmod before the socket is reachable under its real name; then link (not rename) it into
    // place, because link fails if the name exists: two VMMs started on one path cannot silently
    // replace each other's socket.
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .map_err(|source| ApiServerError::SetMode {
            path: tmp.clone(),
            source,
        })
        .and_then(|()| {
            std::fs::hard_link(&tmp, path).map_err(|source| match source.kind() {
                io::ErrorKind::AlreadyExists => ApiServerError::SocketInUse {
                    path: path.to_owned(),
                },
                _ => ApiServerError::Place {
                    path: path.to_owned(),
                    source,
                },
            })
        });
    let _ = std::fs::remove_file(&tmp);
    placed?;
    listener
        .set_nonblocking(true)
        .map_err(|source| ApiServerError::Bind {
            path: path.to_owned(),
            source,
        })?;
    Ok(listener)
}

/// Removes `path` if it is a socket nobody accepts on (left by a VMM that died).
fn remove_stale_socket(path: &Path) -> Result<(), ApiServerError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ApiServerError::InspectSocket {
                path: path.to_owned(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(ApiServerError::NotASocket {
            path: path.to_owned(),
        });
    }
    if StdUnixStream::connect(path).is_ok() {
        return Err(ApiServerError::SocketInUse {
            path: path.to_owned(),
        });
    }
    std::fs::remove_file(path).map_err(|source| ApiServerError::RemoveStaleSocket {
        path: path.to_owned(),
        source,
    })
}

async fn serve(
    listener: StdUnixListener,
    handler: Arc<dyn ApiHandler>,
    options: ServerOptions,
    mut stopped: watch::Receiver<bool>,
) {
    let listener = match tokio::net::UnixListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            log::error!("api socket cannot join the runtime: {e}");
            return;
        }
    };
    let options = Arc::new(options);
    let slots = Arc::new(Semaphore::new(options.max_connections.max(1)));
    let open = Arc::new(Mutex::new(OpenConnections::default()));
    loop {
        let stream = tokio::select! {
            _ = stopped.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of fds and the like: back off instead of spinning.
                    log::warn!("api accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            // Full: clients that hold connections without asking anything (or dribble their
            // heads) must not lock the others out, so the longest-idle one makes room.
            Err(_) if lock(&open).evict_oldest_idle() => {
                match tokio::time::timeout(EVICT_WAIT, slots.clone().acquire_owned()).await {
                    Ok(Ok(slot)) => slot,
                    _ => {
                        log::warn!("api: too many connections, closing a new one");
                        continue;
                    }
                }
            }
            Err(_) => {
                log::warn!("api: every connection is being answered, closing a new one");
                continue;
            }
        };
        let handler = handler.clone();
        let options = options.clone();
        let mut stopped = stopped.clone();
        let open = open.clone();
        let (id, busy, evict) = lock(&open).add();
        tokio::spawn(async move {
            tokio::select! {
                _ = stopped.changed() => {}
                _ = evict.notified() => {
                    log::debug!("api: closed an idle connection to make room for a new one");
                }
                res = serve_connection(stream, handler, options, false, busy) => {
                    if let Err(e) = res {
                        log::debug!("api connection ended: {e}");
                    }
                }
            }
            lock(&open).remove(id);
            drop(slot);
        });
    }
}

/// How long a new connection waits for the slot of the idle one it displaced.
const EVICT_WAIT: Duration = Duration::from_secs(1);

fn lock(open: &Mutex<OpenConnections>) -> std::sync::MutexGuard<'_, OpenConnections> {
    open.lock().unwrap_or_else(|p| p.into_inner())
}

/// The open connections in the order they were accepted, each with whether a request of it is
/// being answered and how to close it.
#[derive(Debug, Default)]
struct OpenConnections {
    next_id: u64,
    conns: VecDeque<(u64, Arc<AtomicBool>, Arc<Notify>)>,
}

impl OpenConnections {
    fn add(&mut self) -> (u64, Arc<AtomicBool>, Arc<Notify>) {
        let id = self.next_id;
        self.next_id += 1;
        let entry = (
            id,
            Arc::new(AtomicBool::new(false)),
            Arc::new(Notify::new()),
        );
        self.conns.push_back(entry.clone());
        entry
    }

    fn remove(&mut self, id: u64) {
        self.conns.retain(|(i, _, _)| *i != id);
    }

    /// Closes the oldest connection with no request in flight; false if every one has one.
    fn evict_oldest_idle(&mut self) -> bool {
        let Some(pos) = self
            .conns
            .iter()
            .position(|(_, busy, _)| !busy.load(Ordering::Acquire))
        else {
            return false;
        };
        if let Some((_, _, evict)) = self.conns.remove(pos) {
            // Stored if the connection's task is not waiting yet: it ends at its next poll.
            evict.notify_one();
        }
        true
    }
}

/// Marks a connection busy while one of its requests is being answered.
struct Busy(Arc<AtomicBool>);

impl Busy {
    fn new(flag: &Arc<AtomicBool>) -> Self {
        flag.store(true, Ordering::Release);
        Busy(flag.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Serves HTTP/1.1 requests on one accepted connection until either side closes it; `busy` is
/// true while a request of it is being answered.
async fn serve_connection<S>(
    stream: S,
    handler: Arc<dyn ApiHandler>,
    options: Arc<ServerOptions>,
    half_close: bool,
    busy: Arc<AtomicBool>,
) -> Result<(), hyper::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let read_timeout = options.header_read_timeout;
    let service = service_fn(move |req| {
        let busy = Busy::new(&busy);
        let answer = handle(req, handler.clone(), options.clone());
        async move {
            let answer = answer.await;
            drop(busy);
            answer
        }
    });
    http1::Builder::new()
        .timer(TokioTimer::new())
        // CH's client finds the body only through `Content-Length: ` spelled exactly so.
        .title_case_headers(true)
        .header_read_timeout(Some(read_timeout))
        .max_buf_size(16 * 1024)
        .half_close(half_close)
        .serve_connection(TokioIo::new(stream), service)
        .await
}

/// Serves one connection whose client writes `request`, closes its sending side and reads until
/// the server closes: returns every byte the server answered. The request goes through exactly
/// what a socket client's does (hyper's parser, the head and body limits, routing, body parsing,
/// the handler deadline), except that the server keeps answering after the client's half-close.
/// The API fuzz targets and their corpus replay drive the server through this. Fails with
/// [`io::ErrorKind::TimedOut`] when the exchange has not ended within `deadline`.
pub fn answer_raw(
    handler: Arc<dyn ApiHandler>,
    options: ServerOptions,
    request: &[u8],
    deadline: Duration,
) -> io::Result<Vec<u8>> {
    use std::io::{Read, Write};
    let (mut client, server) = StdUnixStream::pair()?;
    server.set_nonblocking(true)?;
    let request = request.to_vec();
    let client = std::thread::Builder::new()
        .name("tern-api-raw".into())
        .spawn(move || -> io::Result<Vec<u8>> {
            // The server may stop reading early (413, a malformed head): its answer is still read.
            let _ = client.write_all(&request);
            let _ = client.shutdown(std::net::Shutdown::Write);
            let mut answer = Vec::new();
            client.read_to_end(&mut answer)?;
            Ok(answer)
        })?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .max_blocking_threads(options.handler_threads.max(1))
        .build()?;
    let served = runtime.block_on(async {
        let stream = tokio::net::UnixStream::from_std(server)?;
        let busy = Arc::new(AtomicBool::new(false));
        let conn = serve_connection(stream, handler, Arc::new(options), true, busy);
        match tokio::time::timeout(deadline, conn).await {
            // A connection error (bad request head, EOF inside a message) is an answer too.
            Ok(_) => Ok(()),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the api connection did not end",
            )),
        }
    });
    // Closes the server side (if the deadline passed) so the client thread's read ends, and
    // joins the handler threads, so nothing of this exchange outlives the call (the fuzzer's
    // leak check found a handler thread's allocations still live after shutdown_background).
    runtime.shutdown_timeout(deadline);
    let answer = client
        .join()
        .map_err(|_| io::Error::other("the api client thread panicked"))?;
    served?;
    answer
}

async fn handle(
    req: Request<Incoming>,
    handler: Arc<dyn ApiHandler>,
    options: Arc<ServerOptions>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let endpoint = match router::route(req.method().as_str(), req.uri().path()) {
        Ok(e) => e,
        Err(e) => return Ok(error_response(&e)),
    };
    let body = if endpoint.request_schema().is_some() {
        match read_body(req, options.max_body_bytes).await {
            Ok(body) => body,
            Err(e) => return Ok(error_response(&e)),
        }
    } else {
        Bytes::new()
    };
    let call = tokio::task::spawn_blocking(move || router::dispatch(endpoint, &body, &*handler));
    let result = match tokio::time::timeout(options.handler_timeout, call).await {
        Ok(Ok(result)) => result,
        Ok(Err(join_error)) => {
            log::error!("api handler for {} panicked: {join_error}", endpoint.name());
            Err(ApiError::Internal {
                reason: format!(
                    "the VMM failed while handling {}: see its log",
                    endpoint.name()
                ),
            })
        }
        Err(_) => Err(ApiError::Unavailable {
            reason: deadline_reason(endpoint, options.handler_timeout),
        }),
    };
    Ok(match result {
        Ok(Reply::NoContent) => empty_response(StatusCode::NO_CONTENT),
        Ok(Reply::Json(value)) => json_response(StatusCode::OK, &value),
        Err(e) => error_response(&e),
    })
}

fn deadline_reason(endpoint: Endpoint, timeout: Duration) -> String {
    format!(
        "the VMM did not answer {} within {} ms: it may be busy, retry later",
        endpoint.name(),
        timeout.as_millis()
    )
}

async fn read_body(req: Request<Incoming>, limit: usize) -> Result<Bytes, ApiError> {
    let too_large = ApiError::PayloadTooLarge { limit_bytes: limit };
    // hyper has already rejected a malformed Content-Length; a valid one above the limit is refused
    // before reading, so a client cannot make us read (or allocate) a huge body.
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(too_large);
    }
    match Limited::new(req.into_body(), limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => Err(too_large),
        Err(e) => Err(ApiError::BadRequest {
            reason: format!("cannot read the request body: {e}"),
        }),
    }
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    let body = crate::wire::to_ascii_json(value);
    let mut resp = empty_response(status);
    *resp.body_mut() = Full::new(Bytes::from(body));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn empty_response(status: StatusCode) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = status;
    // `HTTP/1.1 204 \r\n`: CH's client parses everything after the version as the status code.
    resp.extensions_mut().insert(crate::wire::reason_phrase());
    resp
}

fn error_response(err: &ApiError) -> Response<Full<Bytes>> {
    let status =
        StatusCode::from_u16(err.status_code()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = json_response(status, &err.to_body());
    match err {
        ApiError::MethodNotAllowed { allowed, .. } => {
            resp.headers_mut()
                .insert(ALLOW, HeaderValue::from_static(allowed));
        }
        // The unread rest of the body is still on the connection: close it rather than read it.
        ApiError::PayloadTooLarge { .. } => {
            resp.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        _ => {}
    }
    resp
}
