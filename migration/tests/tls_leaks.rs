//! TLS connections leave nothing behind (no thread per connection, the socket closes with the
//! last handle), whichever side ends a connection and how: /proc/self/fd and /proc/self/task are
//! back to their counts afterwards. (Its own test binary: other tests' threads and fds would move
//! the counts.)

mod pki;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use pki::Ca;
use tern_migration::transport::{
    Connection, MigrationListener, MigrationUrl, TlsClient, TlsServer,
};

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).expect("proc").count()
}

fn settle(fds: usize, threads: usize) -> (usize, usize) {
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let now = (count("/proc/self/fd"), count("/proc/self/task"));
        if now == (fds, threads) || Instant::now() > until {
            return now;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn connections_close_their_sockets() {
    let ca = Ca::new("tern test ca");
    let dir = pki::both_dir(&ca, &["127.0.0.1"]);
    let server = TlsServer::from_dir(&dir).expect("server");
    let client = TlsClient::from_dir(&dir).expect("client");
    let listener = MigrationListener::bind_tls(
        &MigrationUrl::parse("tcp:127.0.0.1:0").expect("url"),
        server,
    )
    .expect("bind");
    let url = listener.url().clone().with_tls(client).expect("tls url");
    let base = (count("/proc/self/fd"), count("/proc/self/task"));

    for how in 0..5 {
        let u = url.clone();
        let t = std::thread::spawn(move || Connection::connect(&u).expect("connect"));
        let mut s = listener.accept().expect("accept");
        let mut c = t.join().expect("client");
        // 8 MiB each way, with a clone reading while the original writes.
        let data: Vec<u8> = (0..8u32 << 20).map(|i| (i * 7 + (i >> 13)) as u8).collect();
        let expect = data.clone();
        let mut reader = s.try_clone().expect("clone");
        let r = std::thread::spawn(move || {
            let mut got = vec![0; expect.len()];
            for _ in 0..2 {
                reader.read_exact(&mut got).expect("read");
                assert!(got == expect, "bytes arrive intact");
            }
            reader
        });
        c.write_all(&data).expect("write");
        c.write_all(&data).expect("write again");
        let reader = r.join().expect("reader");
        assert_eq!(
            settle(count("/proc/self/fd"), base.1).1,
            base.1,
            "case {how}: no thread of the connection's own while it is open"
        );
        s.write_all(b"back").expect("write back");
        let mut b = [0; 4];
        c.read_exact(&mut b).expect("read back");
        assert_eq!(&b, b"back");
        let (mut c, mut s, mut reader) = (Some(c), Some(s), Some(reader));
        match how {
            // The sender drops every handle: the receiver reads EOF.
            0 => {
                drop(c.take());
                let mut rest = Vec::new();
                s.as_mut()
                    .expect("server")
                    .read_to_end(&mut rest)
                    .expect("eof");
                assert!(rest.is_empty());
            }
            // The receiver shuts down: the sender reads EOF.
            1 => {
                s.as_ref().expect("server").shutdown();
                let mut rest = Vec::new();
                c.as_mut()
                    .expect("client")
                    .read_to_end(&mut rest)
                    .expect("eof");
                assert!(rest.is_empty());
            }
            // Read side shut (the receiver's cancel), then everything dropped with data in flight.
            2 => {
                reader.as_ref().expect("reader").shutdown_read();
                let c = c.as_mut().expect("client");
                c.write_all(&data[..1 << 20])
                    .expect("write into a shut reader");
            }
            // The receiver is gone: the sender's writes fail in its send thread, then all drop.
            3 => {
                drop(s.take());
                drop(reader.take());
                let c = c.as_mut().expect("client");
                let failed = (0..256).any(|_| c.write_all(&data).is_err());
                assert!(failed, "writes to a closed peer fail");
            }
            // Both dropped at once without shutdown.
            _ => {}
        }
        drop((s, c, reader));
        assert_eq!(
            settle(base.0, base.1),
            base,
            "case {how}: fds and threads back to (fds, threads) at start"
        );
    }
}
