//! The source's greeting on its first connection: preamble, Hello and the setup frames (config)
//! go out without waiting for the destination's preamble, which it reads afterwards — the
//! destination finds all of it when it first wakes and starts building at once. A destination
//! that answers only after the config has arrived still gets a working handshake; one that then
//! refuses is reported with its reason and the source VM never pauses.

mod common;

use std::io::Read;
use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tern_migration::engine::{error_chain, start_send, MigrationStats, SendParams};
use tern_migration::protocol::{read_preamble, write_preamble, Frame, FrameReader, FrameWriter};
use tern_migration::transport::MigrationUrl;

#[test]
fn the_source_sends_hello_and_config_before_it_reads_the_destinations_preamble() {
    let path = sock_path();
    let listener = UnixListener::bind(&path).expect("bind");
    let dst = std::thread::spawn(move || -> Result<Vec<&'static str>, String> {
        let (mut c, _) = listener.accept().map_err(|e| e.to_string())?;
        // A safety net, not a measure: a source that waits for this side's preamble first
        // never sends Hello, and this read fails instead of hanging the test.
        c.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        read_preamble(&mut c).map_err(|e| format!("source preamble: {e}"))?;
        let mut seen = Vec::new();
        {
            let mut r = FrameReader::new(c.try_clone().map_err(|e| e.to_string())?);
            loop {
                match r.recv().map_err(|e| format!("after {seen:?}: {e}"))? {
                    Frame::Hello(_) => seen.push("hello"),
                    Frame::Config(_) => {
                        seen.push("config");
                        break;
                    }
                    f => seen.push(f.tag().name()),
                }
            }
        }
        // Only now this side's preamble, then a refusal the source must report.
        write_preamble(&mut c).map_err(|e| e.to_string())?;
        FrameWriter::new(&mut c)
            .send(&Frame::Error("test destination: no VM today"))
            .map_err(|e| e.to_string())?;
        // Until the source closes.
        let _ = c.read_to_end(&mut Vec::new());
        Ok(seen)
    });

    let host = FakeHost::new(anon_memory(), 64, 50);
    let log = host.log.clone();
    let mut p = SendParams::new(MigrationUrl::Unix(path));
    p.chunk_bytes = 1 << 20;
    p.ack_timeout = Duration::from_secs(10);
    let stats = Arc::new(MigrationStats::new());
    let out = start_send(Box::new(host), p, stats)
        .expect("spawn")
        .join()
        .expect("source thread");

    let seen = dst.join().expect("destination thread");
    assert_eq!(seen, Ok(vec!["hello", "config"]));
    let text = out.result.as_ref().err().map(|e| error_chain(e));
    assert!(
        text.as_deref().is_some_and(|t| t.contains("no VM today")),
        "{text:?}"
    );
    assert!(
        !log.events().iter().any(|e| e == "pause"),
        "the source paused: {:?}",
        log.events()
    );
}
