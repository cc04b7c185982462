//! The TLS stream's own guarantees below the engine: data survives key updates in both directions
//! at once, with each side reading and writing on its own thread; long writes arrive in order
//! across key updates, and a failed send or a shutdown reaches the writer; a stream cut short or
//! altered on the wire is an error, never a clean end of stream; a read timeout in the middle of a
//! record loses nothing.

mod pki;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;

use pki::Ca;
use tern_migration::transport::{
    Connection, MigrationListener, MigrationUrl, TcpLink, TlsClient, TlsServer,
};

fn tls_dir() -> std::path::PathBuf {
    pki::both_dir(&Ca::new("tern test ca"), &["127.0.0.1"])
}

/// A TLS listener for `dir` and the URL clients reach it at.
fn listen(dir: &Path) -> (MigrationListener, MigrationUrl) {
    let server = TlsServer::from_dir(dir).expect("server");
    let l = MigrationListener::bind_tls(
        &MigrationUrl::parse("tcp:127.0.0.1:0").expect("url"),
        server,
    )
    .expect("bind");
    let u = l.url().clone();
    (l, u)
}

fn connect(url: MigrationUrl, dir: &Path) -> std::thread::JoinHandle<Connection> {
    let url = url
        .with_tls(TlsClient::from_dir(dir).expect("client"))
        .expect("tls url");
    std::thread::spawn(move || Connection::connect(&url).expect("connect"))
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(seed) ^ (i >> 11)) as u8)
        .collect()
}

fn rekey_every(c: &Connection, records: u64) {
    match c {
        Connection::Tcp(TcpLink::Tls(s)) => s.rekey_every(records),
        other => panic!("not tls: {other:?}"),
    }
}

#[test]
fn both_directions_at_once_across_key_updates() {
    let dir = tls_dir();
    let (l, url) = listen(&dir);
    let t = connect(url, &dir);
    let s = l.accept().expect("accept");
    let c = t.join().expect("client");
    // A KeyUpdate every 3 records: 8 MiB is ~170 updates each way.
    rekey_every(&c, 3);
    rekey_every(&s, 3);
    let len = 8 << 20;
    let mut threads = Vec::new();
    for (conn, seed_out, seed_in) in [(c, 7, 13), (s, 13, 7)] {
        let mut r = conn.try_clone().expect("clone");
        threads.push(std::thread::spawn(move || {
            let mut got = vec![0; len];
            r.read_exact(&mut got).expect("read");
            assert!(got == pattern(len, seed_in), "bytes arrive intact");
        }));
        let mut w = conn;
        threads.push(std::thread::spawn(move || {
            w.write_all(&pattern(len, seed_out)).expect("write");
        }));
    }
    for t in threads {
        t.join().expect("thread");
    }
}

#[test]
fn long_writes_arrive_in_order_across_key_updates() {
    let dir = tls_dir();
    let (l, url) = listen(&dir);
    let t = connect(url, &dir);
    let mut s = l.accept().expect("accept");
    let mut c = t.join().expect("client");
    // A KeyUpdate every 5 records: inside the 16-record batches of one send and on their edges,
    // so a batch sent out of order or twice, or a key switched at the wrong record, fails to open.
    rekey_every(&c, 5);
    let len = 24 << 20;
    let data = pattern(len, 11);
    let r = std::thread::spawn(move || {
        // Odd read sizes: records straddle reads.
        let mut got = vec![0; len];
        let mut at = 0;
        while at < len {
            let n = s.read(&mut got[at..(at + 777_777).min(len)]).expect("read");
            assert!(n > 0, "early end at {at}");
            at += n;
        }
        assert!(got == pattern(len, 11), "bytes arrive intact and in order");
        s
    });
    // Long writes of many batches each, a short one in between.
    c.write_all(&data[..len / 2]).expect("write");
    c.write_all(&data[len / 2..len / 2 + 100])
        .expect("short write");
    c.write_all(&data[len / 2 + 100..]).expect("write");
    let s = r.join().expect("reader");
    drop((c, s));
}

#[test]
fn a_failed_send_fails_the_writer_and_every_later_write() {
    let dir = tls_dir();
    let (l, url) = listen(&dir);
    let t = connect(url, &dir);
    let s = l.accept().expect("accept");
    let mut c = t.join().expect("client");
    // The receiver goes away: once its socket answers with a reset, sends fail.
    drop(s);
    let data = pattern(4 << 20, 3);
    let mut failed = None;
    for _ in 0..256 {
        if let Err(e) = c.write_all(&data) {
            failed = Some(e);
            break;
        }
    }
    let e = failed.expect("writes to a closed peer fail");
    // The socket's own error, not a stand-in.
    assert!(
        matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset),
        "{e}"
    );
    let again = c
        .write_all(&data)
        .expect_err("a failed stream stays failed");
    assert_eq!(again.kind(), ErrorKind::BrokenPipe, "{again}");
    assert!(again.to_string().contains("failed earlier"), "{again}");
}

#[test]
fn shutdown_wakes_a_writer_blocked_on_a_peer_that_stopped_reading() {
    let dir = tls_dir();
    let (l, url) = listen(&dir);
    let t = connect(url, &dir);
    let s = l.accept().expect("accept");
    let c = t.join().expect("client");
    let handle = c.try_clone().expect("clone");
    // Far more than the socket buffers hold: the writer blocks in `send` whenever the shutdown
    // comes, before or after.
    let w = std::thread::spawn(move || {
        let mut c = c;
        let data = pattern(4 << 20, 9);
        loop {
            if let Err(e) = c.write_all(&data) {
                return e;
            }
        }
    });
    handle.shutdown();
    let e = w.join().expect("writer");
    assert!(
        matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset),
        "{e}"
    );
    drop((handle, s));
}

/// Client → relay → server; `cut(offset, bytes)` may alter what goes to the server or end the
/// stream there (false: shut the server's side down, as a lost or hostile link would).
fn relayed(
    dir: &Path,
    cut: impl FnMut(usize, &mut [u8]) -> bool + Send + 'static,
) -> (Connection, Connection) {
    let (l, server_url) = listen(dir);
    let relay = TcpListener::bind("127.0.0.1:0").expect("relay");
    let relay_url =
        MigrationUrl::parse(&format!("tcp:{}", relay.local_addr().expect("addr"))).expect("url");
    let MigrationUrl::Tcp { port, .. } = server_url else {
        panic!("tcp url")
    };
    std::thread::spawn(move || {
        let (from_client, _) = relay.accept().expect("relay accept");
        let to_server = TcpStream::connect(("127.0.0.1", port)).expect("relay connect");
        let (mut a, mut b) = (
            to_server.try_clone().expect("clone"),
            from_client.try_clone().expect("clone"),
        );
        // Server → client untouched.
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut a, &mut b);
            let _ = b.shutdown(Shutdown::Write);
        });
        let (mut from_client, mut to_server) = (from_client, to_server);
        let mut cut = cut;
        // Small pieces: records (16 KiB) always reach the server split.
        let mut buf = vec![0; 7000];
        let mut off = 0;
        loop {
            let n = match from_client.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if !cut(off, &mut buf[..n]) {
                break;
            }
            if to_server.write_all(&buf[..n]).is_err() {
                break;
            }
            off += n;
        }
        let _ = to_server.shutdown(Shutdown::Write);
        // Keep draining so the client's writes finish.
        let _ = std::io::copy(&mut from_client, &mut std::io::sink());
    });
    let t = connect(relay_url, dir);
    let s = l.accept().expect("accept");
    (t.join().expect("client"), s)
}

/// Send `len` bytes then end the stream properly; what the server reads until its end or error.
fn send_and_read(c: Connection, mut s: Connection, len: usize) -> (Vec<u8>, std::io::Result<()>) {
    let w = std::thread::spawn(move || {
        let mut c = c;
        let _ = c.write_all(&pattern(len, 5));
        // Dropping the last handle sends close_notify.
    });
    let mut got = Vec::new();
    let mut buf = vec![0; 1 << 20];
    let res = loop {
        match s.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => break Err(e),
        }
    };
    w.join().expect("writer");
    (got, res)
}

#[test]
fn an_intact_stream_ends_cleanly_through_the_relay() {
    let dir = tls_dir();
    let (c, s) = relayed(&dir, |_, _| true);
    let len = 4 << 20;
    let (got, res) = send_and_read(c, s, len);
    res.expect("clean end after close_notify");
    assert!(got == pattern(len, 5), "bytes arrive intact");
}

#[test]
fn a_stream_cut_on_the_wire_is_an_error_not_an_end() {
    let dir = tls_dir();
    // Everything up to the cut arrives, then a TCP FIN without close_notify.
    let (c, s) = relayed(&dir, |off, _| off < 300_000);
    let len = 4 << 20;
    let (got, res) = send_and_read(c, s, len);
    let e = res.expect_err("a truncated stream must not read as its end");
    assert_eq!(e.kind(), ErrorKind::UnexpectedEof, "{e}");
    assert!(e.to_string().contains("close_notify"), "{e}");
    assert!(got.len() < len && got[..] == pattern(len, 5)[..got.len()]);
}

#[test]
fn an_altered_record_is_an_error() {
    let dir = tls_dir();
    // Flip one bit well past the handshake.
    let (c, s) = relayed(&dir, |off, b| {
        let at = 200_000usize;
        if (off..off + b.len()).contains(&at) {
            b[at - off] ^= 0x10;
        }
        true
    });
    let len = 4 << 20;
    let (got, res) = send_and_read(c, s, len);
    let e = res.expect_err("an altered record must fail");
    assert_eq!(e.kind(), ErrorKind::InvalidData, "{e}");
    assert!(got.len() < 200_000 && got[..] == pattern(len, 5)[..got.len()]);
}

#[test]
fn a_read_timeout_mid_record_loses_nothing() {
    let dir = tls_dir();
    // After the handshake, each piece of a record arrives 30 ms after the last one.
    let (c, mut s) = relayed(&dir, |off, _| {
        if off > 20_000 {
            std::thread::sleep(std::time::Duration::from_millis(30));
        }
        true
    });
    s.set_read_timeout(Some(std::time::Duration::from_millis(10)))
        .expect("timeout");
    let len = 200_000;
    let w = std::thread::spawn(move || {
        let mut c = c;
        c.write_all(&pattern(len, 3)).expect("write");
    });
    // Reads time out between pieces (10 ms against 30 ms), most of them with part of a record
    // buffered; whatever the scheduling, every byte must come through once.
    let mut got = Vec::new();
    let mut buf = vec![0; 64 << 10];
    while got.len() < len {
        match s.read(&mut buf) {
            Ok(0) => panic!("early end"),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("read: {e}"),
        }
    }
    w.join().expect("writer");
    assert!(got == pattern(len, 3), "bytes arrive intact");
}
