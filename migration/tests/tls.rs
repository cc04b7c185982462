//! Migration over mutual TLS: a migration completes over every connection with a handshake of
//! its own; a sender whose certificate another CA signed, and a receiver whose certificate names
//! another host, are refused at the handshake with the source still running; missing or bad files
//! are named.

mod common;
mod pki;

use std::sync::Arc;
use std::time::Duration;

use common::{anon_memory, assert_same_memory, FakeFactory, FakeGuestView, FakeHost};
use pki::Ca;
use tern_migration::engine::{
    error_chain, receive_on, start_send, MigrationError, MigrationStats, MigrationStatus,
    MigrationTarget, SendParams,
};
use tern_migration::transport::{
    Connection, MigrationListener, MigrationUrl, TlsClient, TlsServer, TransportError,
};

struct Outcome {
    src: Result<(), MigrationError>,
    dst: Result<Box<dyn MigrationTarget>, MigrationError>,
    src_stats: Arc<MigrationStats>,
    guest: Arc<FakeGuestView>,
}

fn loopback() -> MigrationUrl {
    MigrationUrl::parse("tcp:127.0.0.1:0").expect("url")
}

fn migrate(server: TlsServer, client: TlsClient, connections: u16) -> (Outcome, common::Mem) {
    let listener = MigrationListener::bind_tls(&loopback(), server).expect("bind");
    let url = listener.url().clone().with_tls(client).expect("tcp url");
    let dst_stats = Arc::new(MigrationStats::new());
    let ds = dst_stats.clone();
    let dst = std::thread::spawn(move || {
        let mut f = FakeFactory::default();
        receive_on(&listener, &mut f, &ds)
    });
    let host = FakeHost::new(anon_memory(), 256, 20);
    let mem = host.mem.clone();
    let guest = FakeGuestView::of(&host);
    let mut params = SendParams::new(url);
    params.chunk_bytes = 2 << 20;
    params.downtime_ms = 20;
    params.timeout = Duration::from_secs(60);
    params.connections = connections;
    let src_stats = Arc::new(MigrationStats::new());
    let out = start_send(Box::new(host), params, src_stats.clone())
        .expect("spawn")
        .join()
        .expect("source thread");
    if out.result.is_err() {
        // A peer that failed authentication does not end the receive (anyone who can reach the
        // port could otherwise abort it): the operator cancels it.
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            !dst.is_finished(),
            "the receive ended on a refused handshake"
        );
        dst_stats.cancel();
    }
    let dst = dst.join().expect("destination thread");
    (
        Outcome {
            src: out.result,
            dst,
            src_stats,
            guest,
        },
        mem,
    )
}

fn assert_refused(o: &Outcome, src_says: &[&str]) {
    let src = match &o.src {
        Ok(()) => panic!("the source must fail"),
        Err(e) => error_chain(e),
    };
    for s in src_says {
        assert!(src.contains(s), "source error {src:?} lacks {s:?}");
    }
    assert!(
        matches!(o.dst, Err(MigrationError::Cancelled)),
        "the destination kept waiting until cancelled: {:?}",
        o.dst.as_ref().err().map(|e| error_chain(e))
    );
    assert!(!o.guest.is_paused(), "the source VM keeps running");
    assert_eq!(o.src_stats.snapshot().status, MigrationStatus::Failed);
}

#[test]
fn migration_over_tls_completes_on_every_connection() {
    let ca = Ca::new("tern test ca");
    let dir = pki::both_dir(&ca, &["127.0.0.1", "localhost"]);
    for connections in [1, 3] {
        let server = TlsServer::from_dir(&dir).expect("server tls");
        let client = TlsClient::from_dir(&dir).expect("client tls");
        let (o, mem) = migrate(server, client, connections);
        if let Err(e) = &o.src {
            panic!("source failed: {}", error_chain(e));
        }
        match &o.dst {
            Ok(t) => assert_same_memory(&mem, &t.guest_memory()),
            Err(e) => panic!("destination failed: {}", error_chain(e)),
        }
        assert_eq!(o.src_stats.snapshot().status, MigrationStatus::Completed);
    }
}

#[test]
fn client_certificate_from_another_ca_is_refused_by_the_receiver() {
    let ca = Ca::new("tern test ca");
    let rogue = Ca::new("rogue ca");
    let server = TlsServer::from_dir(&pki::server_dir(&ca, &ca, &["127.0.0.1"])).expect("server");
    // Trusts the right CA for the receiver, but its own certificate is the rogue CA's.
    let client = TlsClient::from_dir(&pki::client_dir(&ca, &rogue)).expect("client");
    let (o, _) = migrate(server, client, 1);
    assert_refused(&o, &["tls handshake with 127.0.0.1:", "UnknownCA"]);
}

#[test]
fn receiver_certificate_for_another_host_is_refused_by_the_sender() {
    let ca = Ca::new("tern test ca");
    let server = TlsServer::from_dir(&pki::server_dir(&ca, &ca, &["192.0.2.7", "other.example"]))
        .expect("server");
    let client = TlsClient::from_dir(&pki::client_dir(&ca, &ca)).expect("client");
    let (o, _) = migrate(server, client, 1);
    assert_refused(&o, &["tls handshake with 127.0.0.1:", "not valid for name"]);
}

#[test]
fn receiver_certificate_from_another_ca_is_refused_by_the_sender() {
    let ca = Ca::new("tern test ca");
    let rogue = Ca::new("rogue ca");
    let server = TlsServer::from_dir(&pki::server_dir(&ca, &rogue, &["127.0.0.1"])).expect("srv");
    let client = TlsClient::from_dir(&pki::client_dir(&ca, &ca)).expect("client");
    let (o, _) = migrate(server, client, 1);
    assert_refused(&o, &["UnknownIssuer"]);
}

#[test]
fn plain_client_is_refused_by_a_tls_receiver() {
    let ca = Ca::new("tern test ca");
    let dir = pki::both_dir(&ca, &["127.0.0.1"]);
    let listener =
        MigrationListener::bind_tls(&loopback(), TlsServer::from_dir(&dir).expect("srv"))
            .expect("bind");
    let url = listener.url().clone();
    let t = std::thread::spawn(move || {
        let mut c = Connection::connect(&url).expect("tcp connect");
        use std::io::Write;
        let _ = c.write_all(b"TERNMIG plain hello, not a TLS ClientHello");
        std::thread::sleep(Duration::from_millis(100));
    });
    let e = listener.accept().expect_err("plain tcp must not pass");
    let msg = error_chain(&MigrationError::Transport(e));
    assert!(msg.contains("tls handshake with 127.0.0.1:"), "{msg}");
    t.join().expect("client");
}

#[test]
fn missing_and_bad_files_are_named() {
    let ca = Ca::new("tern test ca");
    let empty = pki::temp_dir();
    let e = TlsClient::from_dir(&empty).expect_err("empty dir");
    assert!(e.to_string().contains("ca-cert.pem"), "{e}");
    let e = TlsServer::from_dir(&empty).expect_err("empty dir");
    assert!(e.to_string().contains("ca-cert.pem"), "{e}");

    // The CA alone: each side names its own missing certificate, then key.
    pki::write(&empty, "ca-cert.pem", &ca.cert.pem());
    let e = TlsClient::from_dir(&empty).expect_err("no client cert");
    assert!(e.to_string().contains("client-cert.pem"), "{e}");
    let e = TlsServer::from_dir(&empty).expect_err("no server cert");
    assert!(e.to_string().contains("server-cert.pem"), "{e}");
    let (c, _) = ca.leaf(&["x"], true);
    pki::write(&empty, "client-cert.pem", &c);
    let e = TlsClient::from_dir(&empty).expect_err("no client key");
    assert!(e.to_string().contains("client-key.pem"), "{e}");

    // Garbage where a key should be, and a key that is not the certificate's.
    pki::write(&empty, "client-key.pem", "not a key\n");
    let e = TlsClient::from_dir(&empty).expect_err("bad key");
    assert!(e.to_string().contains("client-key.pem"), "{e}");
    let (_, other_key) = ca.leaf(&["y"], true);
    pki::write(&empty, "client-key.pem", &other_key);
    let e = TlsClient::from_dir(&empty).expect_err("mismatched key");
    let msg = format!("{e}: {:?}", std::error::Error::source(&e));
    assert!(msg.contains("client-cert.pem and client-key.pem"), "{msg}");
    // A certificate file without a certificate.
    pki::write(
        &empty,
        "ca-cert.pem",
        "-----BEGIN NOTHING-----\n-----END NOTHING-----\n",
    );
    let e = TlsClient::from_dir(&empty).expect_err("no ca");
    assert!(e.to_string().contains("ca-cert.pem"), "{e}");
}

#[test]
fn tls_needs_a_tcp_url() {
    let ca = Ca::new("tern test ca");
    let dir = pki::both_dir(&ca, &["127.0.0.1"]);
    let unix = MigrationUrl::Unix(common::sock_path());
    let client = TlsClient::from_dir(&dir).expect("client");
    assert!(unix.clone().with_tls(client).is_err());
    let server = TlsServer::from_dir(&dir).expect("server");
    assert!(matches!(
        MigrationListener::bind_tls(&unix, server),
        Err(TransportError::Bind { .. })
    ));
}
