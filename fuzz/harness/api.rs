//! API request path targets: raw bytes on one connection to the real server (`request`: hyper's
//! parser, head/body limits, routing, JSON bodies), and the router's body parsing for every
//! endpoint without HTTP (`body`). Invariant: every request gets a well-formed HTTP answer (or the
//! connection closes), never a 500 (a panic) and never a hang; an accepted body round-trips.

use std::sync::Arc;
use std::time::Duration;

use tern_api::router::{dispatch, route};
use tern_api::server::answer_raw;
use tern_api::{
    ApiError, ApiHandler, Endpoint, MigrationStatus, ServerOptions, VmInfo, VmReceiveMigrationData,
    VmSendMigrationData, VmmPingResponse,
};

/// Accepts every call; checks that validated bodies survive a serde round trip.
#[derive(Debug)]
pub struct NullHandler;

fn round_trips<T>(v: &T)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let json = serde_json::to_vec(v).expect("an accepted body serializes");
    let back: T = serde_json::from_slice(&json).expect("a serialized body parses again");
    assert_eq!(&back, v);
}

impl ApiHandler for NullHandler {
    fn vmm_ping(&self) -> Result<VmmPingResponse, ApiError> {
        Ok(VmmPingResponse {
            build_version: "fuzz".into(),
            version: "fuzz".into(),
            pid: 1,
            features: vec![],
        })
    }
    fn vmm_shutdown(&self) -> Result<(), ApiError> {
        Ok(())
    }
    fn vm_create(&self, _config: tern_api::vm_create::VmCreateConfig) -> Result<(), ApiError> {
        Ok(())
    }
    fn vm_boot(&self) -> Result<(), ApiError> {
        Ok(())
    }
    fn vm_delete(&self) -> Result<(), ApiError> {
        Ok(())
    }
    fn vm_reboot(&self) -> Result<(), ApiError> {
        Ok(())
    }
    fn vm_info(&self) -> Result<VmInfo, ApiError> {
        Err(ApiError::NoVm)
    }
    fn vm_pause(&self) -> Result<(), ApiError> {
        Ok(())
    }
    fn vm_resume(&self) -> Result<(), ApiError> {
        Ok(())
    }
    fn vm_shutdown(&self) -> Result<(), ApiError> {
        Ok(())
    }
    fn vm_send_migration(&self, data: VmSendMigrationData) -> Result<(), ApiError> {
        round_trips(&data);
        Ok(())
    }
    fn vm_receive_migration(&self, data: VmReceiveMigrationData) -> Result<(), ApiError> {
        round_trips(&data);
        Ok(())
    }
    fn vm_migration_status(&self) -> Result<MigrationStatus, ApiError> {
        Err(ApiError::NoMigrationRunning)
    }
    fn vm_migration_cancel(&self) -> Result<(), ApiError> {
        Err(ApiError::NoMigrationRunning)
    }
}

fn check_error(e: &ApiError) {
    let status = e.status_code();
    assert!(
        (400..500).contains(&status),
        "a client's request answered {status}: {e:?}"
    );
    assert!(!e.to_string().is_empty());
}

/// Target `api_body`: byte 0 picks the endpoint, byte 1 how the route is asked for, the rest is the
/// body (or `METHOD PATH` for the route).
pub fn body(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let endpoint = Endpoint::ALL[usize::from(which) % Endpoint::ALL.len()];
    if which >= 0xf0 {
        let text = String::from_utf8_lossy(rest);
        let (method, path) = text.split_once(' ').unwrap_or(("GET", &text));
        match route(method, path) {
            Ok(e) => assert_eq!((e.method().as_str(), e.path().as_str()), (method, path)),
            Err(e) => check_error(&e),
        }
        return;
    }
    if let Err(e) = dispatch(endpoint, rest, &NullHandler) {
        match e {
            // The handler's own answers.
            ApiError::NoVm | ApiError::NoMigrationRunning => {}
            e => check_error(&e),
        }
    }
}

fn options() -> ServerOptions {
    ServerOptions {
        max_body_bytes: 4096,
        handler_timeout: Duration::from_secs(5),
        header_read_timeout: Duration::from_secs(2),
        max_connections: 1,
        handler_threads: 1,
    }
}

/// Checks the bytes a server answered: a sequence of complete HTTP/1.1 responses, none a 5xx.
fn check_answer(mut answer: &[u8], request: &[u8]) {
    while !answer.is_empty() {
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut resp = httparse::Response::new(&mut headers);
        let head = match resp.parse(answer) {
            Ok(httparse::Status::Complete(n)) => n,
            other => panic!(
                "malformed answer {other:?}: {:?} to {:?}",
                String::from_utf8_lossy(answer),
                String::from_utf8_lossy(request)
            ),
        };
        let code = resp.code.expect("status code");
        assert!(
            code < 500,
            "answered {code}: {:?} to {:?}",
            String::from_utf8_lossy(answer),
            String::from_utf8_lossy(request)
        );
        let len = resp
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .and_then(|h| std::str::from_utf8(h.value).ok()?.parse::<usize>().ok())
            .unwrap_or(0);
        let body = answer.get(head..head + len).expect("the whole body");
        if len > 0 {
            // tern's own answers (hyper's answers to malformed heads carry no body): Cloud
            // Hypervisor's client reads them, so an empty reason phrase and an ASCII body.
            assert_eq!(
                resp.reason,
                Some(""),
                "{:?}",
                String::from_utf8_lossy(answer)
            );
            assert!(body.is_ascii(), "{:?}", String::from_utf8_lossy(body));
        }
        if code >= 400 && len > 0 {
            let v: serde_json::Value = serde_json::from_slice(body).expect("a JSON error body");
            let messages = v.as_array().expect("an array of messages");
            assert!(
                !messages.is_empty() && messages.iter().all(|m| m.is_string()),
                "{v}"
            );
        }
        answer = &answer[head + len..];
    }
}

/// Target `api_request`: the bytes a client writes on one connection before closing its side.
pub fn request(data: &[u8]) {
    let answer = answer_raw(
        Arc::new(NullHandler),
        options(),
        data,
        Duration::from_secs(20),
    )
    .expect("the server answers and closes the connection");
    check_answer(&answer, data);
}

fn put(endpoint: &str, body: &str) -> Vec<u8> {
    format!(
        "PUT /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

const BODIES: [(&str, &str); 6] = [
    (
        "vm.send-migration",
        r#"{"destination_url":"tcp:127.0.0.1:6000","downtime_ms":300,"connections":4}"#,
    ),
    (
        "vm.send-migration",
        r#"{"destination_url":"unix:/tmp/m.sock","local":true,"timeout_s":60,"timeout_strategy":"cancel","max_bandwidth_mbps":1000,"auto_converge":true}"#,
    ),
    (
        "vm.receive-migration",
        r#"{"receiver_url":"tcp:0.0.0.0:6000"}"#,
    ),
    (
        "vm.receive-migration",
        r#"{"receiver_url":"unix:/tmp/m.sock","devices":[{"id":"mtty0","path":"/sys/bus/mdev/devices/83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"}]}"#,
    ),
    ("vm.send-migration", r#"{"destination_url":"tcp:[::1]:7"}"#),
    ("vm.send-migration", r#"{"destination_url":5}"#),
];

/// Seeds for `api_request`: every endpoint with its method, the bodied ones with valid bodies,
/// two requests on one connection, a chunked body.
pub fn request_seeds() -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = Endpoint::ALL
        .iter()
        .filter(|e| e.request_schema().is_none())
        .map(|e| {
            format!(
                "{} {} HTTP/1.1\r\nHost: localhost\r\n\r\n",
                e.method().as_str(),
                e.path()
            )
            .into_bytes()
        })
        .collect();
    out.extend(BODIES.iter().map(|(e, b)| put(e, b)));
    let mut two = b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
    two.extend(put("vm.receive-migration", BODIES[2].1));
    out.push(two);
    let body = BODIES[0].1;
    out.push(
        format!(
            "PUT /api/v1/vm.send-migration HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
             {:x}\r\n{body}\r\n0\r\n\r\n",
            body.len()
        )
        .into_bytes(),
    );
    out
}

/// Seeds for `api_body`: each endpoint with a valid body, and routes.
pub fn body_seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (name, b) in BODIES {
        let i = Endpoint::ALL
            .iter()
            .position(|e| e.name() == name)
            .unwrap_or(0);
        let mut s = vec![i as u8];
        s.extend_from_slice(b.as_bytes());
        out.push(s);
    }
    for e in Endpoint::ALL {
        let mut s = vec![0xf0];
        s.extend_from_slice(format!("{} {}", e.method().as_str(), e.path()).as_bytes());
        out.push(s);
    }
    out
}

/// Every request seed gets an answer, and the valid bodies are accepted (204).
pub fn seeds_are_answered() {
    for s in request_seeds() {
        let answer = answer_raw(
            Arc::new(NullHandler),
            options(),
            &s,
            Duration::from_secs(20),
        )
        .expect("answered");
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.1 "), "{text:?}");
        let valid_body = BODIES[..5].iter().any(|(_, b)| s.ends_with(b.as_bytes()));
        if valid_body {
            assert!(text.contains("HTTP/1.1 204"), "{text:?}");
        }
    }
}
