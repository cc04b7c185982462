//! Cloud Hypervisor compatibility: every endpoint tern has, driven by requests written exactly as
//! CH's client library writes them and answers read by its rules (`common::ch_client`, from CH's
//! `api_client/src/lib.rs`), with the bodies current `ch-remote` sends (CH's `api_types`
//! `VmSendMigrationData` / `VmReceiveMigrationData` serialized whole) — up to a full live
//! migration of the demo guest between two tern processes, over tcp and over a unix socket,
//! with the guest's verifier clean at the destination.

mod common;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::ch_client::{call, call_json, error_messages, parse_response, request_bytes, ChError};
use common::*;
use serde_json::{json, Value};

/// One at a time: each test keeps busy guests on a 2-core host.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const GUEST: &str = "demo,mib=8,dirty-mib-per-s=64";
const T: Duration = Duration::from_secs(60);

fn serialize() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

fn vm(dir: &TempDir, name: &str) -> TernProcess {
    let p = TernProcess::start(
        dir,
        name,
        &["--memory", "128M", "--cpus", "1", "--guest", GUEST],
    );
    p.wait_more_passes(2, T);
    p
}

/// CH's `VmConfig` for the VM [`vm`] starts from the command line, serial to `DIR/NAME.log`.
fn vm_config_body(dir: &TempDir, name: &str) -> Value {
    json!({
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": 128u64 << 20, "shared": false, "thp": true},
        "payload": {"demo": {"mib": 8, "dirty_mib_per_s": 64}},
        "serial": {"mode": "File", "file": dir.join(&format!("{name}.log"))},
        "console": {"mode": "Off"},
        "disks": null, "net": null, "devices": [],
    })
}

/// The same VM as [`vm`], given to a tern started with only `--api-socket` the way CH-managing
/// tools give one: `vm.create` then `vm.boot`.
fn vm_by_api(dir: &TempDir, name: &str) -> TernProcess {
    let p = TernProcess::start(dir, name, &[]);
    put_ok(&p, "vm.create", Some(&vm_config_body(dir, name)));
    assert_eq!(get(&p, "vm.info")["state"], "Created");
    put_ok(&p, "vm.boot", None);
    p.wait_more_passes(2, T);
    p
}

/// A GET that must succeed with a JSON body.
fn get(p: &TernProcess, command: &str) -> Value {
    match call(&p.socket, "GET", command, None) {
        Ok(Some(body)) => serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{command}: body is not JSON ({e}): {body}")),
        other => panic!("{command}: {other:?}\n{}", p.stderr_text()),
    }
}

/// A PUT that must succeed without a body (204), as CH's client sees it.
fn put_ok(p: &TernProcess, command: &str, body: Option<&Value>) {
    let answer = match body {
        Some(b) => call_json(&p.socket, "PUT", command, b),
        None => call(&p.socket, "PUT", command, None),
    };
    assert_eq!(answer, Ok(None), "{command}\n{}", p.stderr_text());
}

/// A request that must fail with `code` and an error array whose text names `fragment`.
fn refused(
    p: &TernProcess,
    method: &str,
    command: &str,
    body: Option<&Value>,
    code: u16,
    fragment: &str,
) {
    let text = body.map(Value::to_string);
    let err = call(&p.socket, method, command, text.as_deref())
        .expect_err(&format!("{method} {command} {body:?} succeeded"));
    let (got, messages) = error_messages(&err);
    assert_eq!(got, code, "{method} {command} {body:?}: {messages:?}");
    assert!(
        !messages.is_empty() && messages.iter().all(|m| !m.is_empty()),
        "{messages:?}"
    );
    assert!(
        messages.join(": ").contains(fragment),
        "{method} {command} {body:?}: {messages:?} lacks {fragment:?}"
    );
}

/// The unit-level rules of the stand-in client itself: the bytes it writes are CH's, and it
/// refuses what CH's client refuses (the old tern status line).
#[test]
fn stand_in_client_writes_and_reads_as_ch_does() {
    assert_eq!(
        request_bytes("GET", "vmm.ping", None),
        b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n"
    );
    assert_eq!(
        request_bytes("PUT", "vm.x", Some("{}")),
        b"PUT /api/v1/vm.x HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\nContent-Length: 2\r\n\r\n{}"
    );
    let ok = b"HTTP/1.1 200 \r\nContent-Length: 2\r\n\r\n{}";
    assert_eq!(parse_response(&mut &ok[..]), Ok(Some("{}".into())));
    let empty = b"HTTP/1.1 204 \r\n\r\n";
    assert_eq!(parse_response(&mut &empty[..]), Ok(None));
    let old = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
    assert_eq!(
        parse_response(&mut &old[..]),
        Err(ChError::StatusCodeParsing("200 OK".into()))
    );
    let err = b"HTTP/1.1 400 \r\nContent-Length: 5\r\n\r\n[\"x\"]";
    assert_eq!(
        error_messages(&parse_response(&mut &err[..]).unwrap_err()),
        (400, vec!["x".to_owned()])
    );
}

#[test]
fn ping_and_info_read_as_cloud_hypervisor_shapes() {
    let _g = serialize();
    let dir = TempDir::new("ch-info");
    let p = vm(&dir, "vm");
    let ping = get(&p, "vmm.ping");
    assert!(
        ping["version"].as_str().is_some_and(|v| !v.is_empty()),
        "{ping}"
    );
    assert!(
        ping["build_version"]
            .as_str()
            .is_some_and(|v| !v.is_empty()),
        "{ping}"
    );
    assert_eq!(ping["pid"], p.child.id(), "{ping}");
    assert!(
        ping["features"]
            .as_array()
            .is_some_and(|f| f.iter().all(Value::is_string)),
        "{ping}"
    );

    let info = get(&p, "vm.info");
    assert_eq!(info["state"], "Running", "{info}");
    let config = &info["config"];
    assert_eq!(
        config["cpus"],
        json!({"boot_vcpus": 1, "max_vcpus": 1}),
        "{info}"
    );
    assert_eq!(config["memory"]["size"], 128u64 << 20, "{info}");
    assert_eq!(info["memory_actual_size"], 128u64 << 20, "{info}");
    assert_eq!(config["payload"]["kernel"], Value::Null, "{info}");
    assert_eq!(config["payload"]["demo"]["mib"], 8, "{info}");
    assert_eq!(config["payload"]["demo"]["dirty_mib_per_s"], 64, "{info}");
    assert_eq!(config["serial"]["mode"], "File", "{info}");
    assert_eq!(
        config["serial"]["file"],
        p.serial.display().to_string(),
        "{info}"
    );
    assert_eq!(config["devices"], json!([]), "{info}");
    assert_eq!(config["dirty_tracking"], "log", "{info}");
}

#[test]
fn lifecycle_commands_answer_as_ch_expects() {
    let _g = serialize();
    let dir = TempDir::new("ch-life");
    let mut p = vm(&dir, "vm");
    put_ok(&p, "vm.pause", None);
    assert_eq!(get(&p, "vm.info")["state"], "Paused");
    put_ok(&p, "vm.resume", None);
    assert_eq!(get(&p, "vm.info")["state"], "Running");
    p.wait_more_passes(1, T);
    put_ok(&p, "vm.shutdown", None);
    // CH keeps a shut-down VM's configuration: it can boot again.
    assert_eq!(get(&p, "vm.info")["state"], "Shutdown");
    refused(&p, "PUT", "vm.reboot", None, 409, "shut down");
    put_ok(&p, "vm.boot", None);
    assert_eq!(get(&p, "vm.info")["state"], "Running");
    refused(&p, "PUT", "vm.boot", None, 409, "running");
    p.wait_more_passes(1, T);
    put_ok(&p, "vm.reboot", None);
    assert_eq!(get(&p, "vm.info")["state"], "Running");
    p.wait_more_passes(1, T);
    // Three boots of the demo guest, each verifying its memory from scratch.
    let text = p.serial_text();
    assert_eq!(text.matches("DEMO: start").count(), 3, "{text}");
    put_ok(&p, "vm.delete", None);
    refused(&p, "GET", "vm.info", None, 409, "no VM");
    refused(&p, "PUT", "vm.boot", None, 409, "no VM");
    assert_eq!(get(&p, "vmm.ping")["pid"], p.child.id());
    put_ok(&p, "vmm.shutdown", None);
    let exit = p.wait_exit(Duration::from_secs(10));
    assert!(
        exit.is_some_and(|e| e.success()),
        "{exit:?}: {}",
        p.stderr_text()
    );
    assert_verifier_clean(&p.serial_text());
}

/// Errors reach CH's client as its error arrays; the fields of CH's bodies that tern does not
/// implement are refused naming the field, and nothing starts.
#[test]
fn errors_are_arrays_and_unsupported_ch_fields_are_refused_by_name() {
    let _g = serialize();
    let dir = TempDir::new("ch-errors");
    let p = TernProcess::start(&dir, "idle", &[]);
    let send = |extra: Value| {
        let mut body = json!({"destination_url": format!("unix:{}", dir.join("m.sock").display())});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    };
    let recv = |extra: Value| {
        let mut body = json!({"receiver_url": format!("unix:{}", dir.join("r.sock").display())});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    };
    let cases = [
        (
            "vm.send-migration",
            send(json!({"memory_mode": "Postcopy"})),
            400,
            "memory_mode is Postcopy",
        ),
        (
            "vm.send-migration",
            send(json!({"preserve_source": true})),
            400,
            "preserve_source is true",
        ),
        (
            "vm.send-migration",
            send(json!({"connections": 129})),
            400,
            "connections is 129",
        ),
        (
            "vm.send-migration",
            send(json!({"timeout_strategy": "Retry"})),
            400,
            "unknown variant `Retry`",
        ),
        (
            "vm.send-migration",
            send(json!({"preserve_source": false})),
            409,
            "no VM",
        ),
        (
            "vm.receive-migration",
            recv(json!({"memory_mode": "Postcopy"})),
            400,
            "memory_mode is Postcopy",
        ),
        (
            "vm.receive-migration",
            recv(json!({"vfio_fds": [{"id": "vfio0", "fd": 5}]})),
            400,
            "vfio_fds",
        ),
        (
            "vm.receive-migration",
            recv(json!({"iommufd_fd": 3})),
            400,
            "iommufd_fd",
        ),
        (
            "vm.receive-migration",
            recv(json!({"zone_updates": [{"id": "zone0", "host_numa_node": 1}]})),
            400,
            "zone_updates",
        ),
    ];
    for (command, body, code, fragment) in &cases {
        refused(&p, "PUT", command, Some(body), *code, fragment);
    }
    // A body that does not parse: the outer message names the endpoint, the inner one the cause.
    let err = call(
        &p.socket,
        "PUT",
        "vm.send-migration",
        Some("{\"destination_url\": 7}"),
    )
    .unwrap_err();
    let (code, messages) = error_messages(&err);
    assert_eq!(code, 400);
    assert!(
        messages[0].starts_with("invalid body for vm.send-migration"),
        "{messages:?}"
    );
    assert!(
        messages.len() >= 2 && messages[1].contains("invalid type"),
        "{messages:?}"
    );

    refused(&p, "GET", "vm.info", None, 409, "no VM");
    refused(
        &p,
        "PUT",
        "vm.migration-cancel",
        None,
        409,
        "nothing to cancel",
    );
    refused(&p, "GET", "vm.pause", None, 405, "use PUT");
    // CH endpoints tern does not have (vm.create and its kin are being added: not listed here).
    for command in ["vm.counters", "vm.resize", "vm.snapshot", "vm.power-button"] {
        refused(&p, "PUT", command, None, 404, "no endpoint");
    }
    // Nothing was started by any of them.
    assert_eq!(get(&p, "vm.migration")["status"], "none");
    assert!(!dir.join("r.sock").exists());
}

/// CH's `vm.receive-migration` body as current ch-remote serializes it.
fn ch_receive_body(url: &str) -> Value {
    json!({
        "receiver_url": url, "tls_dir": null, "memory_mode": "Precopy",
        "vfio_fds": null, "iommufd_fd": null, "zone_updates": []
    })
}

/// CH's `vm.send-migration` body as current ch-remote serializes it.
fn ch_send_body(url: &str, connections: u32, memory_mode: &str) -> Value {
    json!({
        "destination_url": url, "local": false, "preserve_source": false,
        "downtime_ms": 300, "timeout_s": 60, "timeout_strategy": "Cancel",
        "connections": connections, "tls_dir": null, "memory_mode": memory_mode
    })
}

/// A full migration driven only by CH-style requests; returns the final `vm.migration` status.
fn migrate_with_ch_requests(
    tag: &str,
    source: fn(&TempDir, &str) -> TernProcess,
    url_of: impl Fn(&TempDir) -> String,
    connections: u32,
    mode: &str,
) -> Value {
    let _g = serialize();
    let dir = TempDir::new(tag);
    let mut src = source(&dir, "src");
    let dst = TernProcess::start(&dir, "dst", &[]);
    let url = url_of(&dir);
    let before = get(&src, "vm.info");

    put_ok(&dst, "vm.receive-migration", Some(&ch_receive_body(&url)));
    put_ok(
        &src,
        "vm.send-migration",
        Some(&ch_send_body(&url, connections, mode)),
    );

    // Follow it on the source (tern's vm.migration, asked the CH way) until it ends or the
    // source exits after handing the VM over.
    let start = Instant::now();
    let mut last = Value::Null;
    while src.is_running() {
        match call(&src.socket, "GET", "vm.migration", None) {
            Ok(Some(body)) => last = serde_json::from_str(&body).unwrap(),
            Ok(None) => panic!("vm.migration answered without a body"),
            // The source is going away: refused, or its server closed an accepted connection
            // without an answer as the process exits.
            Err(ChError::Socket(_) | ChError::MissingProtocol) => {}
            Err(e) => panic!("vm.migration: {e:?}"),
        }
        if matches!(
            last["status"].as_str(),
            Some("failed" | "cancelled" | "in_doubt")
        ) {
            panic!("migration ended {last}\n{}", src.stderr_text());
        }
        assert!(start.elapsed() < T, "migration did not finish: {last}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let exit = src.wait_exit(Duration::from_secs(10));
    assert!(
        exit.is_some_and(|e| e.success()),
        "source {exit:?}: {}",
        src.stderr_text()
    );
    assert_verifier_clean(&src.serial_text());

    let after = get(&dst, "vm.info");
    assert_eq!(after["state"], "Running", "{after}");
    for part in ["cpus", "memory", "payload", "devices", "dirty_tracking"] {
        assert_eq!(
            after["config"][part], before["config"][part],
            "config.{part}: {after}"
        );
    }
    assert_eq!(after["memory_actual_size"], before["memory_actual_size"]);
    let status = get(&dst, "vm.migration");
    assert_eq!(status["status"], "completed", "{status}");
    let text = dst.wait_more_passes(2, T);
    assert!(
        !text.contains("DEMO: start"),
        "destination rebooted the guest:\n{text}"
    );
    assert_verifier_clean(&text);
    put_ok(&dst, "vmm.shutdown", None);
    status
}

#[test]
fn migration_over_tcp_with_128_connections_driven_by_ch_requests() {
    let status = migrate_with_ch_requests(
        "ch-mig-tcp",
        vm,
        |_| format!("tcp:127.0.0.1:{}", free_tcp_port()),
        128,
        "Precopy",
    );
    assert!(status["transferred_bytes"].as_u64() > Some(0), "{status}");
}

#[test]
fn migration_over_unix_socket_driven_by_ch_requests() {
    // The source VM too is given by CH-style requests (vm.create, vm.boot).
    migrate_with_ch_requests(
        "ch-mig-unix",
        vm_by_api,
        |d| format!("unix:{}", d.join("mig.sock").display()),
        1,
        "Precopy",
    );
}

/// `memory_mode: "MemFDs"` is tern's local migration: memory handed over, not copied.
#[test]
fn migration_with_memfds_hands_memory_over() {
    let status = migrate_with_ch_requests(
        "ch-mig-memfds",
        vm,
        |d| format!("unix:{}", d.join("mig.sock").display()),
        1,
        "MemFDs",
    );
    assert!(
        status["transferred_bytes"].as_u64() < Some(1 << 20),
        "MemFDs copied memory: {status}"
    );
}

/// A VM given by `vm.create` + `vm.boot` is the command line's VM: `vm.info` equal but for the
/// serial file each writes to.
#[test]
fn vm_create_and_boot_make_the_command_lines_vm() {
    let _g = serialize();
    let dir = TempDir::new("ch-create");
    let cli = vm(&dir, "cli");
    let api = vm_by_api(&dir, "api");
    let info = |p: &TernProcess, name: &str| {
        let mut info = get(p, "vm.info");
        let file = dir.join(&format!("{name}.log"));
        assert_eq!(
            info["config"]["serial"],
            json!({"mode": "File", "file": file}),
            "{info}"
        );
        info["config"]["serial"]["file"] = json!("DIR/NAME.log");
        info
    };
    assert_eq!(info(&api, "api"), info(&cli, "cli"));
    assert_verifier_clean(&api.wait_more_passes(2, T));
    refused(
        &api,
        "PUT",
        "vm.create",
        Some(&vm_config_body(&dir, "x")),
        409,
        "already has a VM",
    );
}

/// Bad `vm.create` bodies: CH-style error arrays naming the problem, and nothing starts — no VM,
/// no vCPU thread, no serial file — while the VMM goes on answering and takes a good body after.
#[test]
fn bad_vm_create_bodies_are_refused_and_nothing_starts() {
    let _g = serialize();
    let dir = TempDir::new("ch-create-bad");
    let p = TernProcess::start(&dir, "idle", &[]);
    let good = vm_config_body(&dir, "vm");
    let with = |path: &[&str], v: Value| {
        let mut b = good.clone();
        let mut cur = &mut b;
        for k in &path[..path.len() - 1] {
            cur = &mut cur[*k];
        }
        cur[path[path.len() - 1]] = v;
        b
    };
    let cases: Vec<(Value, &str)> = vec![
        (
            with(&["disks"], json!([{"path": "/disk.img"}])),
            "disks is not supported",
        ),
        (
            with(&["memory", "hotplug_size"], json!(1u64 << 30)),
            "memory.hotplug_size",
        ),
        (
            with(&["payload", "firmware"], json!("/fw.bin")),
            "payload.firmware",
        ),
        (
            with(&["cpus"], json!({"boot_vcpus": 0, "max_vcpus": 0})),
            "--cpus must be at least 1",
        ),
        (
            with(&["cpus"], json!({"boot_vcpus": 2, "max_vcpus": 4})),
            "vCPU hotplug",
        ),
        (with(&["memory", "size"], json!(4097)), "4 KiB pages"),
        (
            with(&["payload"], json!({"kernel": "/k", "demo": {}})),
            "not both",
        ),
        (with(&["payload"], json!({})), "nothing to run"),
        (with(&["serial"], json!({"mode": "Pty"})), "\"Pty\""),
        (with(&["dirty_tracking"], json!("bitmap")), "bitmap"),
        (
            with(
                &["devices"],
                json!([{"path": "/a", "id": "d"}, {"path": "/b", "id": "d"}]),
            ),
            "two devices",
        ),
        (json!([1, 2]), "JSON object"),
    ];
    for (body, fragment) in &cases {
        refused(&p, "PUT", "vm.create", Some(body), 400, fragment);
        refused(&p, "GET", "vm.info", None, 409, "no VM");
    }
    refused(&p, "PUT", "vm.boot", None, 409, "no VM");
    let threads = std::fs::read_dir(format!("/proc/{}/task", p.child.id()))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("vcpu"))
        .count();
    assert_eq!(threads, 0, "a refused vm.create started vCPUs");
    assert!(
        !dir.join("vm.log").exists(),
        "a refused vm.create opened its serial file"
    );

    put_ok(&p, "vm.create", Some(&good));
    put_ok(&p, "vm.boot", None);
    assert_eq!(get(&p, "vm.info")["state"], "Running");
}
