//! Single-connection loopback throughput of a whole tern migration (real engine: `start_send`
//! and `receive_on`, one connection) vs a raw socket copy of the same bytes, measured in the same
//! run. The guest is idle and every page is non-zero, so all of it travels as data; the tern time
//! runs from `start_send` to the destination's ack. Target: ratio ≥ 0.8.
//!
//! "raw" writes the source guest memory to the socket in 4 MiB slices and reads into the
//! destination guest memory (the floor for moving these bytes); "raw-cached" moves the same
//! number of bytes between two 4 MiB buffers that stay in cache (an upper bound no migration can
//! reach, printed for context). Both tern modes are measured: unchecked page data (default,
//! zero-copy) and `page_checksums` (zero-copy too, an XXH3 sum per page).
//!
//! Run: `cargo bench -p tern-migration --bench throughput`

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Instant;

use tern_migration::dirty::GuestPageBitmap;
use tern_migration::dirty::{DirtySource, VmmWriteSource, PAGE_SIZE};
use tern_migration::engine::{
    receive_on, start_send, HostError, LocalRegion, MigrationHost, MigrationState, MigrationStats,
    MigrationTarget, MigrationTargetFactory, SendParams,
};
use tern_migration::transport::{MigrationListener, MigrationUrl};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const GUEST: usize = 512 << 20;

type Mem = GuestMemoryMmap<GuestPageBitmap>;

fn guest() -> Mem {
    let m: Mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), GUEST)]).expect("memory");
    let page: Vec<u8> = (0..PAGE_SIZE as usize)
        .map(|i| (i % 251) as u8 + 1)
        .collect();
    for p in 0..(GUEST as u64 / PAGE_SIZE) {
        m.write_slice(&page, GuestAddress(p * PAGE_SIZE))
            .expect("fill");
    }
    m
}

struct IdleHost(Mem);

impl MigrationHost for IdleHost {
    fn guest_memory(&self) -> Mem {
        self.0.clone()
    }
    fn config(&mut self) -> Result<Vec<u8>, HostError> {
        Ok(b"{}".to_vec())
    }
    fn dirty_sources(&mut self) -> Result<Vec<Box<dyn DirtySource>>, HostError> {
        let s = VmmWriteSource::new(&self.0).map_err(|e| HostError::new("dirty sources", e))?;
        Ok(vec![Box::new(s)])
    }
    fn populated(
        &mut self,
        _: tern_migration::dirty::GpaRange,
        _: &mut tern_migration::dirty::DirtyBitmap,
    ) -> Result<bool, HostError> {
        Ok(false)
    }
    fn pause(&mut self) -> Result<(), HostError> {
        Ok(())
    }
    fn pause_devices(&mut self) -> Result<(), HostError> {
        Ok(())
    }
    fn resume(&mut self) -> Result<(), HostError> {
        Ok(())
    }
    fn save_state(&mut self) -> Result<MigrationState, HostError> {
        Ok(MigrationState::default())
    }
    fn throttle(&mut self, _: u8) -> Result<(), HostError> {
        Ok(())
    }
}

struct Target(Mem);

impl MigrationTarget for Target {
    fn guest_memory(&self) -> Mem {
        self.0.clone()
    }
    fn restore_state(&mut self, _: MigrationState) -> Result<(), HostError> {
        Ok(())
    }
    fn start(&mut self) -> Result<(), HostError> {
        Ok(())
    }
}

/// Hands out the same pre-faulted destination memory each run, so both paths write into warm
/// pages.
struct Factory(Mem);

impl MigrationTargetFactory for Factory {
    fn create(
        &mut self,
        _: &[u8],
        _: Vec<LocalRegion>,
    ) -> Result<Box<dyn MigrationTarget>, HostError> {
        Ok(Box::new(Target(self.0.clone())))
    }
}

fn raw(tcp: bool, total: usize) -> f64 {
    let (mut a, mut b): (Box<dyn Write + Send>, Box<dyn Read + Send>) = if tcp {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let a = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (b, _) = l.accept().expect("accept");
        (Box::new(a), Box::new(b))
    } else {
        let (a, b) = UnixStream::pair().expect("pair");
        (Box::new(a), Box::new(b))
    };
    let rx = std::thread::spawn(move || {
        let mut buf = vec![0u8; 4 << 20];
        let mut got = 0;
        while got < total {
            let n = b.read(&mut buf).expect("read");
            assert!(n > 0, "raw peer closed early");
            got += n;
        }
    });
    let src = vec![0x5au8; 4 << 20];
    let t = Instant::now();
    let mut sent = 0;
    while sent < total {
        let n = src.len().min(total - sent);
        a.write_all(&src[..n]).expect("write");
        sent += n;
    }
    rx.join().expect("rx");
    total as f64 / t.elapsed().as_secs_f64()
}

fn raw_guest(tcp: bool, src: &Mem, dst: &Mem) -> f64 {
    use tern_migration::transport::Connection;
    use vm_memory::{GuestMemoryBackend, ReadVolatile, WriteVolatile};
    let (mut a, mut b) = if tcp {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let a = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (b, _) = l.accept().expect("accept");
        (Connection::Tcp(a.into()), Connection::Tcp(b.into()))
    } else {
        let (a, b) = UnixStream::pair().expect("pair");
        (Connection::Unix(a), Connection::Unix(b))
    };
    const STEP: usize = 4 << 20;
    let dst = dst.clone();
    let rx = std::thread::spawn(move || {
        let mut off = 0;
        while off < GUEST {
            let mut s = dst
                .get_slice(GuestAddress(off as u64), STEP)
                .expect("slice");
            b.read_exact_volatile(&mut s).expect("read");
            off += STEP;
        }
    });
    let t = Instant::now();
    let mut off = 0;
    while off < GUEST {
        let s = src
            .get_slice(GuestAddress(off as u64), STEP)
            .expect("slice");
        a.write_all_volatile(&s).expect("write");
        off += STEP;
    }
    rx.join().expect("rx");
    GUEST as f64 / t.elapsed().as_secs_f64()
}

/// Returns (bytes on the wire, bytes/s).
fn tern(tcp: bool, src: &Mem, dst: &Mem, n: usize, checksums: bool) -> (u64, f64) {
    let url = if tcp {
        MigrationUrl::Tcp {
            host: "127.0.0.1".into(),
            port: 0,
        }
    } else {
        MigrationUrl::Unix(
            std::env::temp_dir().join(format!("tern-bench-{}-{n}.sock", std::process::id())),
        )
    };
    let l = MigrationListener::bind(&url).expect("bind");
    let url = l.url().clone();
    let dst = dst.clone();
    let rx = std::thread::spawn(move || {
        let mut f = Factory(dst);
        receive_on(&l, &mut f, &MigrationStats::new())
            .map(|_| ())
            .expect("receive");
    });
    let stats = Arc::new(MigrationStats::new());
    let t = Instant::now();
    let mut params = SendParams::new(url);
    params.page_checksums = checksums;
    let out = start_send(Box::new(IdleHost(src.clone())), params, stats.clone())
        .expect("spawn")
        .join()
        .expect("source");
    let el = t.elapsed().as_secs_f64();
    out.result.expect("migration");
    rx.join().expect("rx");
    let s = stats.snapshot();
    assert_eq!(s.data_pages, GUEST as u64 / PAGE_SIZE);
    (s.transferred_bytes, s.transferred_bytes as f64 / el)
}

fn main() {
    let src = guest();
    let dst: Mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), GUEST)]).expect("memory");
    println!(
        "single-connection loopback, {} MiB idle guest, every page data, best of 3",
        GUEST >> 20
    );
    println!(
        "{:>5} {:>10} {:>11} {:>10} {:>10} {:>11} {:>11}",
        "link", "raw MB/s", "raw-cached", "tern MB/s", "tern+crc", "ratio", "ratio+crc"
    );
    let mut n = 0;
    for tcp in [true, false] {
        n += 1;
        let (wire, _) = tern(tcp, &src, &dst, n, false); // warm-up: faults in the destination
        let (mut raw_g, mut raw_c, mut t_fast, mut t_crc) = (0f64, 0f64, 0f64, 0f64);
        for _ in 0..3 {
            n += 2;
            raw_g = raw_g.max(raw_guest(tcp, &src, &dst));
            raw_c = raw_c.max(raw(tcp, wire as usize));
            t_fast = t_fast.max(tern(tcp, &src, &dst, n, false).1);
            t_crc = t_crc.max(tern(tcp, &src, &dst, n + 1, true).1);
        }
        println!(
            "{:>5} {:>10.0} {:>11.0} {:>10.0} {:>10.0} {:>11.2} {:>11.2}",
            if tcp { "tcp" } else { "unix" },
            raw_g / 1e6,
            raw_c / 1e6,
            t_fast / 1e6,
            t_crc / 1e6,
            t_fast / raw_g,
            t_crc / raw_g
        );
    }
}
