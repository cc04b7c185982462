//! TLS throughput as a ratio of plain TCP, same run, loopback: 1 GiB per connection pushed through
//! `Connection` (what the engine's lanes write to) with 1 and 2 connections. TLS is rustls with the
//! ring provider (TLS 1.3, AES-256-GCM), one pump thread per connection.
//!
//! `cargo bench -p tern-migration --bench tls_throughput`

use std::io::{Read, Write};
use std::time::Instant;

use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use tern_migration::transport::{
    Connection, MigrationListener, MigrationUrl, TlsClient, TlsServer,
};

const PER_CONN: usize = 1 << 30;
const CHUNK: usize = 4 << 20;

fn pki() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tern-tls-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("ca");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let ca_key = KeyPair::generate().expect("key");
    let ca = p.self_signed(&ca_key).expect("ca");
    std::fs::write(dir.join("ca-cert.pem"), ca.pem()).expect("write");
    for (side, eku) in [
        ("server", ExtendedKeyUsagePurpose::ServerAuth),
        ("client", ExtendedKeyUsagePurpose::ClientAuth),
    ] {
        let mut p = CertificateParams::new(vec!["127.0.0.1".to_string()]).expect("leaf");
        p.extended_key_usages = vec![eku];
        let key = KeyPair::generate().expect("key");
        let cert = p.signed_by(&key, &ca, &ca_key).expect("sign");
        std::fs::write(dir.join(format!("{side}-cert.pem")), cert.pem()).expect("write");
        std::fs::write(dir.join(format!("{side}-key.pem")), key.serialize_pem()).expect("write");
    }
    dir
}

/// GB/s moving PER_CONN bytes over each of `n` connections in parallel.
fn run(tls: Option<&std::path::Path>, n: usize) -> f64 {
    let any = MigrationUrl::parse("tcp:127.0.0.1:0").expect("url");
    let listener = match tls {
        Some(d) => MigrationListener::bind_tls(&any, TlsServer::from_dir(d).expect("server")),
        None => MigrationListener::bind(&any),
    }
    .expect("bind");
    let mut url = listener.url().clone();
    if let Some(d) = tls {
        url = url
            .with_tls(TlsClient::from_dir(d).expect("client"))
            .expect("tcp");
    }
    let connector = std::thread::spawn(move || {
        (0..n)
            .map(|_| Connection::connect(&url).expect("connect"))
            .collect::<Vec<_>>()
    });
    let servers: Vec<Connection> = (0..n).map(|_| listener.accept().expect("accept")).collect();
    let clients = connector.join().expect("connector");
    let start = Instant::now();
    let readers: Vec<_> = servers
        .into_iter()
        .map(|mut s| {
            std::thread::spawn(move || {
                let mut buf = vec![0u8; CHUNK];
                let mut got = 0;
                while got < PER_CONN {
                    let r = s.read(&mut buf).expect("read");
                    assert!(r > 0, "early eof");
                    got += r;
                }
            })
        })
        .collect();
    let writers: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            std::thread::spawn(move || {
                let buf = vec![0x5au8; CHUNK];
                for _ in 0..PER_CONN / CHUNK {
                    c.write_all(&buf).expect("write");
                }
                c
            })
        })
        .collect();
    let clients: Vec<_> = writers
        .into_iter()
        .map(|w| w.join().expect("writer"))
        .collect();
    for r in readers {
        r.join().expect("reader");
    }
    let secs = start.elapsed().as_secs_f64();
    drop(clients);
    (n * PER_CONN) as f64 / secs / 1e9
}

fn main() {
    let dir = pki();
    println!(
        "tls_throughput: {} MiB per connection over loopback, {} CPUs",
        PER_CONN >> 20,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    for n in [1, 2] {
        // Best of three each, interleaved so both see the same machine state.
        let (mut plain, mut tls) = (0f64, 0f64);
        for _ in 0..3 {
            plain = plain.max(run(None, n));
            tls = tls.max(run(Some(&dir), n));
        }
        println!(
            "  {n} connection(s): plain tcp {plain:.2} GB/s, tls {tls:.2} GB/s, ratio {:.2}",
            tls / plain
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
