//! One migration between two threads over a real socket: the destination thread receives while
//! the source thread sends, and both outcomes come back for assertions.

use std::sync::Arc;
use std::time::Duration;

use tern_migration::engine::{
    receive_on, start_send, MigrationError, MigrationStats, MigrationTarget, SendParams,
};
use tern_migration::transport::{MigrationListener, MigrationUrl};

use super::{FakeFactory, FakeHost};

pub struct Run {
    pub src: Result<(), MigrationError>,
    pub dst: Result<Box<dyn MigrationTarget>, MigrationError>,
    pub factory: FakeFactory,
    pub src_stats: Arc<MigrationStats>,
    pub dst_stats: Arc<MigrationStats>,
}

pub fn run(
    listen: MigrationUrl,
    host: FakeHost,
    factory: FakeFactory,
    tweak: impl FnOnce(&mut SendParams),
) -> Run {
    let listener = MigrationListener::bind(&listen).expect("bind");
    let url = listener.url().clone();
    let dst_stats = Arc::new(MigrationStats::new());
    let ds = dst_stats.clone();
    let dst = std::thread::spawn(move || {
        let mut f = factory;
        let r = receive_on(&listener, &mut f, &ds);
        (r, f)
    });
    let mut params = SendParams::new(url);
    params.chunk_bytes = 2 << 20;
    params.downtime_ms = 20;
    params.timeout = Duration::from_secs(60);
    tweak(&mut params);
    let src_stats = Arc::new(MigrationStats::new());
    let out = start_send(Box::new(host), params, src_stats.clone())
        .expect("spawn")
        .join()
        .expect("source thread");
    let (dst, factory) = dst.join().expect("destination thread");
    Run {
        src: out.result,
        dst,
        factory,
        src_stats,
        dst_stats,
    }
}
