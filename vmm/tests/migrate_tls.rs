//! Migration TLS and the plain-TCP policy between real `tern` processes: a busy guest migrates
//! over mutual TLS on two connections (the demo guest's verifier stays clean); plain tcp on or to
//! a non-loopback address is refused without `--migration-allow-plain-tcp` (naming the flag and
//! tls_dir) and proceeds with it; a tls_dir missing a file is refused naming the file.

mod common;

use std::time::{Duration, Instant};

use common::*;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use tern_api::types::MigrationState;

const GUEST: &str = "demo,mib=8,dirty-mib-per-s=64";
const T: Duration = Duration::from_secs(60);

/// ca-cert.pem plus both sides' certificates (the receiver's names 127.0.0.1) in `dir`.
fn write_pki(dir: &std::path::Path) {
    std::fs::create_dir_all(dir).unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(DnType::CommonName, "tern test ca");
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate().unwrap();
    let ca = p.self_signed(&ca_key).unwrap();
    std::fs::write(dir.join("ca-cert.pem"), ca.pem()).unwrap();
    for (side, name, eku) in [
        ("server", "127.0.0.1", ExtendedKeyUsagePurpose::ServerAuth),
        ("client", "tern-source", ExtendedKeyUsagePurpose::ClientAuth),
    ] {
        let mut p = CertificateParams::new(vec![name.to_string()]).unwrap();
        p.extended_key_usages = vec![eku];
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &ca, &ca_key).unwrap();
        std::fs::write(dir.join(format!("{side}-cert.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{side}-key.pem")), key.serialize_pem()).unwrap();
    }
}

#[test]
fn migrate_over_mutual_tls_with_two_connections() {
    let dir = TempDir::new("mig-tls");
    let tls = dir.join("tls");
    write_pki(&tls);
    let mut src = TernProcess::start(&dir, "src", &["--memory", "128M", "--guest", GUEST]);
    src.wait_more_passes(2, T);
    let dst = TernProcess::start(&dir, "dst", &[]);
    let url = format!("tcp:127.0.0.1:{}", free_tcp_port());
    dst.client()
        .vm_receive_migration(&receive_body(
            serde_json::json!({ "receiver_url": url, "tls_dir": tls }),
        ))
        .expect("receive-migration");
    src.client()
        .vm_send_migration(&send_body(serde_json::json!({
            "destination_url": url, "tls_dir": tls, "connections": 2
        })))
        .expect("send-migration");
    let start = Instant::now();
    let status = loop {
        match src.client().vm_migration_status() {
            Ok(s) if s.status.is_terminal() => break s,
            Err(_) if !src.is_running() => panic!("source gone: {}", src.stderr_text()),
            _ => {}
        }
        assert!(start.elapsed() < T, "migration did not finish");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        status.status,
        MigrationState::Completed,
        "{status:?}\n{}\n{}",
        src.stderr_text(),
        dst.stderr_text()
    );
    assert!(
        src.wait_exit(Duration::from_secs(10)).is_some(),
        "source exits after handover"
    );
    assert_verifier_clean(&src.serial_text());
    let text = dst.wait_more_passes(2, T);
    assert_verifier_clean(&text);
}

#[test]
fn plain_tcp_to_non_loopback_needs_the_opt_in() {
    let dir = TempDir::new("mig-plain");
    let wild = format!("tcp:0.0.0.0:{}", free_tcp_port());
    let body = receive_body(serde_json::json!({ "receiver_url": wild }));

    let strict = TernProcess::start(&dir, "strict", &[]);
    let e = strict
        .client()
        .vm_receive_migration(&body)
        .expect_err("refused without the opt-in")
        .to_string();
    assert!(
        e.contains("--migration-allow-plain-tcp") && e.contains("tls_dir"),
        "{e}"
    );
    // Loopback stays allowed.
    let lo = format!("tcp:127.0.0.1:{}", free_tcp_port());
    strict
        .client()
        .vm_receive_migration(&receive_body(serde_json::json!({ "receiver_url": lo })))
        .expect("loopback is allowed");

    // A tls_dir missing its files is named.
    let empty = dir.join("empty-tls");
    std::fs::create_dir_all(&empty).unwrap();
    let other = TernProcess::start(&dir, "other", &[]);
    let e = other
        .client()
        .vm_receive_migration(&receive_body(
            serde_json::json!({ "receiver_url": wild, "tls_dir": empty }),
        ))
        .expect_err("no files")
        .to_string();
    assert!(e.contains("ca-cert.pem"), "{e}");

    // Negative control: with the opt-in the same request proceeds.
    let open = TernProcess::start(&dir, "open", &["--migration-allow-plain-tcp"]);
    open.client()
        .vm_receive_migration(&body)
        .expect("allowed with --migration-allow-plain-tcp");

    // The sending side: refused before anything starts; with the opt-in it starts (and fails
    // to connect to the unroutable test address, the guest running on).
    let src = TernProcess::start(&dir, "src", &["--memory", "128M", "--guest", GUEST]);
    src.wait_more_passes(1, T);
    let send = send_body(serde_json::json!({ "destination_url": "tcp:192.0.2.1:9" }));
    let e = src
        .client()
        .vm_send_migration(&send)
        .expect_err("refused without the opt-in")
        .to_string();
    assert!(e.contains("--migration-allow-plain-tcp"), "{e}");
    let src2 = TernProcess::start(
        &dir,
        "src2",
        &[
            "--memory",
            "128M",
            "--guest",
            GUEST,
            "--migration-allow-plain-tcp",
        ],
    );
    src2.wait_more_passes(1, T);
    src2.client()
        .vm_send_migration(&send)
        .expect("allowed with --migration-allow-plain-tcp");
}
