//! The server over a real Unix socket with a fake VMM: routes, errors, limits, socket handling.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use common::{sample_info, FakeVmm, Harness};
use tern_api::{
    ApiClientError, ApiServer, ApiServerError, Endpoint, MigrationState, MigrationStatus,
    ServerOptions, TimeoutStrategy, VmReceiveMigrationData, VmSendMigrationData, VmState,
};

fn put(h: &Harness, name: &str, body: &str) -> tern_api::RawResponse {
    h.client()
        .send_raw("PUT", &format!("/api/v1/{name}"), Some(body.as_bytes()))
        .expect("request")
}

#[test]
fn every_route_reaches_its_handler_method() {
    let h = Harness::start(FakeVmm::with_vm(VmState::Running));
    let c = h.client();

    let ping = c.vmm_ping().unwrap();
    assert_eq!((ping.version.as_str(), ping.pid), ("9.9.9-fake", 4242));
    assert_eq!(c.vm_info().unwrap(), sample_info(VmState::Running));
    c.vm_pause().unwrap();
    assert_eq!(c.vm_info().unwrap().state, VmState::Paused);
    c.vm_resume().unwrap();
    let mut send = VmSendMigrationData::new("tcp:127.0.0.1:6000".parse().unwrap());
    send.connections = 4;
    send.auto_converge = true;
    send.timeout_strategy = TimeoutStrategy::Ignore;
    c.vm_send_migration(&send).unwrap();
    assert_eq!(h.vmm.lock().sent.as_ref(), Some(&send));
    assert_eq!(
        c.vm_migration_status().unwrap().status,
        MigrationState::Setup
    );
    c.vm_migration_cancel().unwrap();
    assert_eq!(
        c.vm_migration_status().unwrap().status,
        MigrationState::Cancelled
    );
    c.vm_shutdown().unwrap();
    c.vmm_shutdown().unwrap();

    assert_eq!(
        h.vmm.calls(),
        [
            "vmm.ping",
            "vm.info",
            "vm.pause",
            "vm.info",
            "vm.resume",
            "vm.send-migration",
            "vm.migration",
            "vm.migration-cancel",
            "vm.migration",
            "vm.shutdown",
            "vmm.shutdown"
        ]
    );
}

#[test]
fn receive_migration_reaches_handler_with_parsed_url() {
    let h = Harness::start(std::sync::Arc::new(FakeVmm::default()));
    let data = VmReceiveMigrationData {
        receiver_url: "unix:/tmp/incoming.sock".parse().unwrap(),
        devices: vec![tern_api::DeviceMapping {
            id: "mtty0".into(),
            path: "/sys/bus/mdev/devices/u1".into(),
        }],
        tls_dir: None,
        memory_mode: tern_api::MigrationMode::Precopy,
    };
    h.client().vm_receive_migration(&data).unwrap();
    assert_eq!(h.vmm.lock().received.as_ref(), Some(&data));
}

#[test]
fn success_statuses_are_200_with_json_or_204_empty() {
    let h = Harness::start(FakeVmm::with_vm(VmState::Running));
    for e in Endpoint::ALL {
        if e.method() != tern_api::HttpMethod::Get {
            continue;
        }
        let resp = h.client().send_raw("GET", &e.path(), None).unwrap();
        assert_eq!(resp.status, 200, "{}", e.name());
        assert_eq!(resp.header("content-type"), Some("application/json"));
        serde_json::from_slice::<serde_json::Value>(&resp.body).unwrap();
    }
    let resp = put(&h, "vm.pause", "");
    assert_eq!(resp.status, 204);
    assert!(resp.body.is_empty());
}

#[test]
fn handler_errors_map_to_status_and_json_error() {
    let h = Harness::start(std::sync::Arc::new(FakeVmm::default()));
    let err = h.client().vm_info().unwrap_err();
    assert_eq!(err.status(), Some(409));
    assert!(err.to_string().contains("no VM in this VMM"), "{err}");

    let err = h.client().vm_migration_cancel().unwrap_err();
    assert_eq!(err.status(), Some(409));
    assert!(err.to_string().contains("nothing to cancel"), "{err}");

    let h = Harness::start(FakeVmm::with_vm(VmState::Running));
    let send = VmSendMigrationData::new("unix:/d".parse().unwrap());
    h.client().vm_send_migration(&send).unwrap();
    let err = h.client().vm_send_migration(&send).unwrap_err();
    assert_eq!(err.status(), Some(409));
    assert!(err.to_string().contains("already running"), "{err}");
}

#[test]
fn unknown_path_is_404_with_json_error() {
    let h = Harness::start(FakeVmm::with_vm(VmState::Running));
    for path in [
        "/api/v1/vm.restore",
        "/",
        "/api/v1/vm.info/extra",
        "/api/v2/vm.info",
    ] {
        let resp = h.client().send_raw("GET", path, None).unwrap();
        assert_eq!(resp.status, 404, "{path}");
        assert!(
            resp.error_text().contains("no endpoint"),
            "{path}: {:?}",
            resp.error_text()
        );
    }
    assert!(h.vmm.calls().is_empty());
}

#[test]
fn wrong_method_is_405_with_allow_header() {
    let h = Harness::start(FakeVmm::with_vm(VmState::Running));
    for e in Endpoint::ALL {
        let wrong = if e.method().as_str() == "GET" {
            "PUT"
        } else {
            "GET"
        };
        for method in [wrong, "POST", "DELETE"] {
            let resp = h.client().send_raw(method, &e.path(), None).unwrap();
            assert_eq!(resp.status, 405, "{method} {}", e.name());
            assert_eq!(resp.header("allow"), Some(e.method().as_str()));
            assert!(
                resp.error_text().contains("does not accept"),
                "{}",
                resp.error_text()
            );
        }
    }
    assert!(h.vmm.calls().is_empty());
}

#[test]
fn bad_bodies_are_400_naming_the_problem_and_never_reach_the_handler() {
    let h = Harness::start(FakeVmm::with_vm(VmState::Running));
    let cases = [
        ("vm.send-migration", "", "needs a JSON body"),
        ("vm.send-migration", "{", "EOF while parsing"),
        ("vm.send-migration", "garbage", "expected value"),
        (
            "vm.send-migration",
            "{}",
            "schema VmSendMigrationData in api/openapi.yaml",
        ),
        (
            "vm.send-migration",
            r#"["tcp:h:1", false, 1, 1, "cancel", 0, 1, false]"#,
            "must be a JSON object, not an array",
        ),
        (
            "vm.send-migration",
            "null",
            "must be a JSON object, not null",
        ),
        ("vm.send-migration", "{}", "missing field `destination_url`"),
        (
            "vm.send-migration",
            r#"{"destination_url": 7}"#,
            "invalid type: integer",
        ),
        (
            "vm.send-migration",
            r#"{"destination_url": "10.0.0.1:6000"}"#,
            "unknown scheme",
        ),
        (
            "vm.send-migration",
            r#"{"destination_url": "tcp:host"}"#,
            "has no port",
        ),
        (
            "vm.send-migration",
            r#"{"destination_url": "tcp:h:99999"}"#,
            "invalid port",
        ),
        (
            "vm.send-migration",
            r#"{"destination_url": "unix:"}"#,
            "empty path",
        ),
        (
            "vm.send-migration",
            r#"{"destination_url": "tcp:h:1", "downtime": 5}"#,
            "unknown field `downtime`",
        ),
        (
            "vm.send-migration",
            r#"{"destination_url": "tcp:h:1", "local": "yes"}"#,
            "invalid type: string",
        ),
        (
            "vm.send-migration",
            r#"{"destination_url": "tcp:h:1", "connections": 129}"#,
            "connections is 129",
        ),
        (
            "vm.send-migration",
            r#"{"destination_url": "tcp:h:1", "local": true}"#,
            "needs a unix:",
        ),
        (
            "vm.send-migration",
            r#"{"destination_url": "tcp:h:1", "timeout_strategy": "abort"}"#,
            "unknown variant `abort`",
        ),
        ("vm.receive-migration", "{}", "missing field `receiver_url`"),
        (
            "vm.receive-migration",
            r#"{"receiver_url": "tcp::1"}"#,
            "empty host",
        ),
        (
            "vm.receive-migration",
            r#"{"receiver_url": "unix:/x", "x": 1}"#,
            "unknown field `x`",
        ),
    ];
    for (name, body, want) in cases {
        let resp = put(&h, name, body);
        assert_eq!(resp.status, 400, "{name} {body}");
        let text = resp.error_text();
        assert!(
            text.contains(want),
            "{name} {body}: {text:?} lacks {want:?}"
        );
    }
    assert!(h.vmm.calls().is_empty(), "{:?}", h.vmm.calls());
}

/// Sends a request head by hand and returns the raw response text.
fn raw_exchange(socket: &std::path::Path, request: &[u8]) -> String {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    // The server closes after answering these requests; a reset after the answer is fine too.
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn huge_declared_body_is_413_before_any_byte_is_read() {
    let h = Harness::start(FakeVmm::with_vm(VmState::Running));
    let started = Instant::now();
    // 1 TiB declared, nothing sent: the answer must come without waiting for (or allocating) it.
    let resp = raw_exchange(
        &h.socket,
        b"PUT /api/v1/vm.send-migration HTTP/1.1\r\nHost: x\r\nContent-Length: 1099511627776\r\n\r\n",
    );
    assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");
    assert!(resp.contains("exceeds 65536 bytes"), "{resp}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(h.vmm.calls().is_empty());
}

#[test]
fn body_over_limit_is_413_with_length_or_chunked() {
    let h = Harness::start(FakeVmm::with_vm(VmState::Running));
    let big = format!(
        r#"{{"destination_url": "tcp:h:1", "pad": "{}"}}"#,
        "x".repeat(70 * 1024)
    );
    let resp = put(&h, "vm.send-migration", &big);
    assert_eq!(resp.status, 413);
    assert!(resp.error_text().contains("exceeds"));

    let mut chunked = b"PUT /api/v1/vm.receive-migration HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..20 {
        chunked.extend_from_slice(b"1000\r\n");
        chunked.extend_from_slice(&[b' '; 0x1000]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let resp = raw_exchange(&h.socket, &chunked);
    assert!(
        resp.starts_with("HTTP/1.1 413"),
        "{}",
        &resp[..resp.len().min(200)]
    );
    assert!(h.vmm.calls().is_empty());
}

#[test]
fn body_just_under_limit_is_parsed() {
    let h = Harness::start(FakeVmm::with_vm(VmState::Running));
    let pad = 60 * 1024;
    let body = format!(r#"{{"destination_url": "tcp:h:1"}}{}"#, " ".repeat(pad));
    let resp = put(&h, "vm.send-migration", &body);
    assert_eq!(resp.status, 204, "{}", resp.error_text());
}

#[test]
fn garbage_and_half_requests_do_not_stop_the_server() {
    let opts = ServerOptions {
        header_read_timeout: Duration::from_millis(300),
        ..ServerOptions::default()
    };
    let h = Harness::start_with(FakeVmm::with_vm(VmState::Running), opts);
    let resp = raw_exchange(&h.socket, b"\x00\x01garbage\r\n\r\n");
    assert!(
        resp.is_empty() || resp.starts_with("HTTP/1.1 400"),
        "{resp}"
    );
    let resp = raw_exchange(
        &h.socket,
        b"PUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: nope\r\n\r\n",
    );
    assert!(
        resp.is_empty() || resp.starts_with("HTTP/1.1 400"),
        "{resp}"
    );
    // A client that sends half a head and stalls is dropped after the header timeout.
    let mut stalled = UnixStream::connect(&h.socket).unwrap();
    stalled.write_all(b"GET /api/v1/vmm.pi").unwrap();
    stalled
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 256];
    let started = Instant::now();
    let _ = stalled.read(&mut buf);
    assert!(started.elapsed() < Duration::from_secs(4));
    // Still serving.
    h.client().vmm_ping().unwrap();
}

#[test]
fn slow_handler_gets_503_and_does_not_block_other_requests() {
    let vmm = FakeVmm::with_vm(VmState::Running);
    vmm.lock().info_delay = Duration::from_millis(1500);
    let opts = ServerOptions {
        handler_timeout: Duration::from_millis(300),
        ..ServerOptions::default()
    };
    let h = Harness::start_with(vmm, opts);
    let slow_client = h.client();
    let slow = std::thread::spawn(move || slow_client.vm_info());
    std::thread::sleep(Duration::from_millis(50));
    let started = Instant::now();
    h.client().vmm_ping().unwrap();
    assert!(started.elapsed() < Duration::from_millis(1000));
    let err = slow.join().unwrap().unwrap_err();
    assert_eq!(err.status(), Some(503), "{err}");
    assert!(err.to_string().contains("did not answer vm.info"), "{err}");
}

#[test]
fn panicking_handler_is_500_and_server_keeps_serving() {
    let vmm = FakeVmm::with_vm(VmState::Running);
    vmm.lock().panic_on_vm_shutdown = true;
    let h = Harness::start(vmm);
    let err = h.client().vm_shutdown().unwrap_err();
    assert_eq!(err.status(), Some(500), "{err}");
    h.client().vmm_ping().unwrap();
}

#[test]
fn socket_is_mode_0600() {
    let h = Harness::start(FakeVmm::with_vm(VmState::Running));
    let meta = std::fs::metadata(&h.socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    // No temporary name is left beside it.
    let names: Vec<_> = std::fs::read_dir(h.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, [std::ffi::OsString::from("api.sock")]);
}

#[test]
fn stale_socket_is_replaced_live_one_and_regular_file_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    // A socket file nobody listens on any more, as a crashed VMM leaves it.
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let server = ApiServer::start(&path, FakeVmm::with_vm(VmState::Running)).unwrap();
    tern_api::ApiClient::new(&path).vmm_ping().unwrap();

    match ApiServer::start(&path, FakeVmm::with_vm(VmState::Running)) {
        Err(ApiServerError::SocketInUse { .. }) => {}
        other => panic!("second server on a live socket: {other:?}"),
    }
    // The refused start must not have disturbed the running server.
    tern_api::ApiClient::new(&path).vmm_ping().unwrap();
    server.shutdown().unwrap();

    let file = dir.path().join("notes.txt");
    std::fs::write(&file, "keep me").unwrap();
    match ApiServer::start(&file, FakeVmm::with_vm(VmState::Running)) {
        Err(ApiServerError::NotASocket { .. }) => {}
        other => panic!("server over a regular file: {other:?}"),
    }
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
}

#[test]
fn shutdown_removes_socket_and_stops_serving() {
    let mut h = Harness::start(FakeVmm::with_vm(VmState::Running));
    h.client().vmm_ping().unwrap();
    // An idle keep-alive connection must not hold shutdown up.
    let _idle = UnixStream::connect(&h.socket).unwrap();
    let started = Instant::now();
    h.server.take().unwrap().shutdown().unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(!h.socket.exists());
    match h.client().vmm_ping() {
        Err(ApiClientError::Connect { .. }) => {}
        other => panic!("ping after shutdown: {other:?}"),
    }
}

#[test]
fn migration_status_is_served_as_the_engine_filled_it() {
    let vmm = FakeVmm::with_vm(VmState::Running);
    let status = MigrationStatus {
        status: MigrationState::Completed,
        iteration: 7,
        total_bytes: 512 << 20,
        transferred_bytes: 9 << 20,
        downtime_ms: Some(4),
        total_time_ms: Some(40),
        setup_time_ms: Some(2),
        dirty_pages_by_source: tern_api::DirtyPagesBySource {
            kvm: 10,
            vmm: 2,
            dma: 1,
        },
        ..MigrationStatus::default()
    };
    vmm.lock().script.push_back(status.clone());
    let h = Harness::start(vmm);
    assert_eq!(h.client().vm_migration_status().unwrap(), status);
}

#[test]
fn concurrent_clients_are_all_answered() {
    let h = Harness::start(FakeVmm::with_vm(VmState::Running));
    let threads: Vec<_> = (0..16)
        .map(|_| {
            let c = h.client();
            std::thread::spawn(move || {
                for _ in 0..25 {
                    c.vm_migration_status().unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(h.vmm.calls().len(), 16 * 25);
}

#[test]
fn keep_alive_connection_serves_several_requests_in_order() {
    let h = Harness::start(FakeVmm::with_vm(VmState::Running));
    let resp = raw_exchange(
        &h.socket,
        b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: x\r\n\r\n\
          PUT /api/v1/vm.pause HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n\
          GET /api/v1/vm.info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    // Bodies have no trailing newline, so split on the status-line prefix rather than on lines.
    let statuses: Vec<&str> = resp
        .split("HTTP/1.1 ")
        .skip(1)
        .filter_map(|r| r.lines().next())
        .collect();
    // Cloud Hypervisor's status lines: the code and an empty reason phrase.
    assert_eq!(statuses, ["200 ", "204 ", "200 "], "{resp}");
    // ... and the header CH's client finds the body by, spelled as it searches for it.
    assert_eq!(resp.matches("\r\nContent-Length: ").count(), 2, "{resp}");
    assert!(resp.contains(r#""state":"Paused""#), "{resp}");
    assert_eq!(h.vmm.calls(), ["vmm.ping", "vm.pause", "vm.info"]);
}

/// Clients holding every connection slot — idle, or dribbling a request head a byte at a time —
/// do not lock out the next client: it takes the place of the longest-idle one and is answered
/// at once, long before the header timeout would have freed a slot.
#[test]
fn clients_hogging_every_connection_do_not_stop_others_being_answered() {
    let opts = ServerOptions {
        max_connections: 8,
        header_read_timeout: Duration::from_secs(30),
        ..ServerOptions::default()
    };
    let h = Harness::start_with(FakeVmm::with_vm(VmState::Running), opts);
    let mut hogs = Vec::new();
    for i in 0..40 {
        let mut s = UnixStream::connect(&h.socket).unwrap();
        if i % 2 == 0 {
            s.write_all(b"GET /api/v1/vmm.pi").unwrap();
        }
        hogs.push(s);
    }
    for round in 0..5 {
        let started = Instant::now();
        h.client().vmm_ping().unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "round {round}: {:?}",
            started.elapsed()
        );
        // The slow ones keep sending, one byte each.
        for s in hogs.iter_mut().skip(30) {
            let _ = s.write_all(b"n");
        }
    }
    // A displaced client sees its connection closed (not a hang).
    hogs[0]
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 64];
    let started = Instant::now();
    let _ = hogs[0].read(&mut buf);
    assert!(started.elapsed() < Duration::from_secs(4));
}
