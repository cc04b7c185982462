//! Single-connection loopback throughput of a whole tern migration (real engine: `start_send`
//! and `receive_on`, one connection) vs a raw socket copy of the same bytes, measured in the same
//! round. The guest is idle and every page is non-zero, so all of it travels as data; the tern time
//! runs from `start_send` to the destination's ack. Goal: ratio ≥ 0.95 with page sums on. CPU
//! seconds per GB (both ends, the whole process) are printed too: on a shared machine they move
//! less than the rates do.
//!
//! "raw" writes the source guest memory to the socket in 4 MiB slices and reads into the
//! destination guest memory (the floor for moving these bytes); "raw-cached" moves the same
//! number of bytes between two 4 MiB buffers that stay in cache (an upper bound no migration can
//! reach, printed for context). Both tern modes are measured: unchecked page data (default,
//! zero-copy) and `page_checksums` (zero-copy too, an XXH3 sum per page).
//!
//! Guest memory is a shared memory file, as in the VMM. On Unix sockets tern sends page data
//! with `sendfile` from that file (`transport::sendfile`; on TCP it writes from the mapping),
//! while "raw" always writes from the mapping. Unix sockets get the send buffer tern's transport
//! gives its own (`transport::sockopt`) in the raw copies too, so the ratio compares equal
//! sockets.
//!
//! Run: `cargo bench -p tern-migration --bench throughput` (`TERN_BENCH_ROUNDS=n`, default 5;
//! `TERN_BENCH_LINKS=tcp` or `unix` measures one link, e.g. under `perf record`, and `tls`
//! measures migration TLS (mutual auth, loopback) against the same raw TCP copy;
//! `TERN_BENCH_PIN=1` runs the sending end on CPU 0 and the receiving end on CPU 1 — every
//! thread each end starts inherits it — as two hosts would have a core each, where by default
//! both ends share both cores).
//!
//! A loopback has no line: both ends share the CPU, so any work a migration adds costs rate.
//! `TERN_BENCH_LINE_GBIT=10,15,20` (root, iproute2) measures behind a link instead: the bench
//! moves into a network namespace of its own (gone with the process, qdisc and all), and before
//! each rate's rows shapes its loopback with a token bucket (`tc … tbf rate Ngbit`), so raw and
//! tern run over the same capped TCP link. Unix sockets do not pass a qdisc and are skipped.

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
use tern_migration::transport::sockopt::enlarge_unix_send_buffer;
use tern_migration::transport::{MigrationListener, MigrationUrl, TlsClient, TlsServer};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};

#[path = "../tests/pki/mod.rs"]
mod pki;

const GUEST: usize = 512 << 20;

/// What the migration runs over; the raw copies use TCP for TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Tcp,
    Unix,
    Tls,
}

impl Link {
    fn name(self) -> &'static str {
        match self {
            Link::Tcp => "tcp",
            Link::Unix => "unix",
            Link::Tls => "tls",
        }
    }

    fn over_tcp(self) -> bool {
        self != Link::Unix
    }
}

/// The bench's `tls_dir`, made on first use and removed at the end of `main`.
fn tls_dir() -> &'static std::path::Path {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| pki::both_dir(&pki::Ca::new("tern bench CA"), &["127.0.0.1"]))
}

type Mem = GuestMemoryMmap<GuestPageBitmap>;

/// Guest memory as the VMM has it: one shared memory file (here in /dev/shm, shmem like the
/// VMM's memfd), mapped.
fn shared_memory() -> Mem {
    let path = std::env::temp_dir().join(format!("tern-bench-ram-{}", std::process::id()));
    let shm = std::path::Path::new("/dev/shm").join(path.file_name().expect("name"));
    let (file, at) = match std::fs::File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&shm)
    {
        Ok(f) => (f, shm),
        Err(_) => (
            std::fs::File::options()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .expect("memory file"),
            path,
        ),
    };
    std::fs::remove_file(at).expect("unlink the memory file");
    file.set_len(GUEST as u64).expect("size the memory file");
    GuestMemoryMmap::from_ranges_with_files(&[(
        GuestAddress(0),
        GUEST,
        Some(FileOffset::new(file, 0)),
    )])
    .expect("memory")
}

fn guest() -> Mem {
    let m = shared_memory();
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

/// `TERN_BENCH_PIN=1`: each end on a core of its own.
fn pinned() -> bool {
    std::env::var("TERN_BENCH_PIN").as_deref() == Ok("1")
}

/// When [`pinned`], binds the calling thread (and the threads it starts) to `cpu`.
fn pin(cpu: usize) {
    if !pinned() {
        return;
    }
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET writes inside it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is below CPU_SETSIZE (0 or 1 here).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is the calling thread; the set is initialised and its size is passed.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    assert_eq!(r, 0, "sched_setaffinity to CPU {cpu}");
}

/// A connected Unix pair whose writing end has the send buffer tern gives its own (so the raw
/// copy is measured on the same socket as the migration).
fn unix_pair() -> (UnixStream, UnixStream) {
    let (a, b) = UnixStream::pair().expect("pair");
    enlarge_unix_send_buffer(&a).expect("send buffer");
    (a, b)
}

fn raw(tcp: bool, total: usize) -> f64 {
    let (mut a, mut b): (Box<dyn Write + Send>, Box<dyn Read + Send>) = if tcp {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let a = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (b, _) = l.accept().expect("accept");
        (Box::new(a), Box::new(b))
    } else {
        let (a, b) = unix_pair();
        (Box::new(a), Box::new(b))
    };
    let rx = std::thread::spawn(move || {
        pin(1);
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
        let (a, b) = unix_pair();
        (Connection::Unix(a), Connection::Unix(b))
    };
    const STEP: usize = 4 << 20;
    let dst = dst.clone();
    let rx = std::thread::spawn(move || {
        pin(1);
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
fn tern(link: Link, src: &Mem, dst: &Mem, n: usize, checksums: bool) -> (u64, f64) {
    let url = if link.over_tcp() {
        MigrationUrl::Tcp {
            host: "127.0.0.1".into(),
            port: 0,
        }
    } else {
        MigrationUrl::Unix(
            std::env::temp_dir().join(format!("tern-bench-{}-{n}.sock", std::process::id())),
        )
    };
    let l = if link == Link::Tls {
        MigrationListener::bind_tls(&url, TlsServer::from_dir(tls_dir()).expect("tls server"))
    } else {
        MigrationListener::bind(&url)
    }
    .expect("bind");
    let mut url = l.url().clone();
    if link == Link::Tls {
        url = url
            .with_tls(TlsClient::from_dir(tls_dir()).expect("tls client"))
            .expect("a tcp url");
    }
    let dst = dst.clone();
    let rx = std::thread::spawn(move || {
        pin(1);
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
    // Unix: every page sent by sendfile from the memory file; TCP: copied by write.
    let from_file = if link == Link::Unix { GUEST as u64 } else { 0 };
    assert_eq!(s.sent_from_file_bytes, from_file);
    (s.transferred_bytes, s.transferred_bytes as f64 / el)
}

/// Process CPU time (user + system, every thread) so far, in seconds.
fn cpu_s() -> f64 {
    let mut u = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given; RUSAGE_SELF is always valid.
    let r = unsafe { libc::getrusage(libc::RUSAGE_SELF, u.as_mut_ptr()) };
    assert_eq!(r, 0, "getrusage");
    // SAFETY: initialised by the successful call above (and zeroed before).
    let u = unsafe { u.assume_init() };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

/// Runs `f` (returning bytes/s for `bytes` moved); returns (bytes/s, CPU seconds per GB).
fn measured(bytes: usize, f: impl FnOnce() -> f64) -> (f64, f64) {
    let c = cpu_s();
    let rate = f();
    (rate, (cpu_s() - c) / (bytes as f64 / 1e9))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Rounds per link: `TERN_BENCH_ROUNDS`, default 5.
fn rounds() -> usize {
    std::env::var("TERN_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(5)
}

/// Links to measure: `TERN_BENCH_LINKS` (`tcp`, `unix`, `tls`), default tcp and unix.
fn links() -> Vec<Link> {
    match std::env::var("TERN_BENCH_LINKS").as_deref() {
        Ok("tcp") => vec![Link::Tcp],
        Ok("unix") => vec![Link::Unix],
        Ok("tls") => vec![Link::Tls],
        _ => vec![Link::Tcp, Link::Unix],
    }
}

/// `TERN_BENCH_LINE_GBIT`: link rates (Gbit/s) to shape the loopback to, in order; none when
/// unset.
fn line_rates() -> Vec<f64> {
    let Ok(list) = std::env::var("TERN_BENCH_LINE_GBIT") else {
        return Vec::new();
    };
    list.split(',')
        .map(|v| match v.trim().parse::<f64>() {
            Ok(g) if g.is_finite() && g > 0.0 => g,
            _ => {
                eprintln!(
                    "TERN_BENCH_LINE_GBIT: {v:?} is not a positive rate in Gbit/s (e.g. 10,15,20)"
                );
                std::process::exit(2)
            }
        })
        .collect()
}

/// Runs `cmd` with `args`, exiting with its complaint if it fails.
fn run(cmd: &str, args: &[&str]) {
    match std::process::Command::new(cmd).args(args).output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            eprintln!(
                "{cmd} {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&o.stderr).trim()
            );
            std::process::exit(2)
        }
        Err(e) => {
            eprintln!("{cmd}: {e} (the shaped-link bench needs iproute2)");
            std::process::exit(2)
        }
    }
}

/// Moves this (still single-threaded) process into a network namespace of its own with its
/// loopback up: every thread and command started afterwards inherits it.
fn own_network_namespace() {
    // SAFETY: unshare takes a flag word and touches no memory of ours.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        eprintln!(
            "TERN_BENCH_LINE_GBIT: a network namespace of its own: {} (run as root)",
            std::io::Error::last_os_error()
        );
        std::process::exit(2)
    }
    run("ip", &["link", "set", "lo", "up"]);
}

/// Caps the (namespace's own) loopback at `gbit`: a token bucket deep enough for 64 KiB
/// loopback segments in bursts.
fn shape_loopback(gbit: f64) {
    let rate = format!("{}mbit", (gbit * 1000.0).round() as u64);
    run(
        "tc",
        &[
            "qdisc", "replace", "dev", "lo", "root", "tbf", "rate", &rate, "burst", "4mb",
            "latency", "50ms",
        ],
    );
}

fn main() {
    let line_rates = line_rates();
    if !line_rates.is_empty() {
        own_network_namespace();
    }
    pin(0);
    let rounds = rounds();
    let src = guest();
    let dst = shared_memory();
    println!(
        "single-connection loopback, {} MiB idle guest, every page data; {rounds} rounds of raw, tern, \
         tern with page sums back to back, ratios taken within a round (same load), medians",
        GUEST >> 20
    );
    let (probe, _) = unix_pair();
    println!(
        "unix sockets (raw and tern alike): send buffer {} KiB granted (net.core.wmem_max caps it)",
        enlarge_unix_send_buffer(&probe).expect("send buffer") >> 10
    );
    println!(
        "{:>9} {:>9} {:>9} {:>9} {:>7} {:>9} {:>7} {:>12} {:>12} {:>12}",
        "link",
        "raw MB/s",
        "raw-cach",
        "tern MB/s",
        "ratio",
        "tern+sums",
        "ratio",
        "raw CPU s/GB",
        "tern s/GB",
        "+sums s/GB"
    );
    let mut links = links();
    let mut lines: Vec<Option<f64>> = line_rates.iter().map(|&g| Some(g)).collect();
    if lines.is_empty() {
        lines.push(None);
    } else if links.contains(&Link::Unix) {
        links.retain(|&l| l.over_tcp());
        println!("unix: skipped (a shaped loopback caps TCP only)");
    }
    let mut n = 0;
    for line in lines {
        if let Some(gbit) = line {
            shape_loopback(gbit);
        }
        for &link in &links {
            n += 1;
            let tcp = link.over_tcp();
            let name = match line {
                Some(gbit) => format!("{}@{gbit}G", link.name()),
                None => link.name().to_string(),
            };
            let (wire, _) = tern(link, &src, &dst, n, false); // warm-up: faults in the destination
            let mut cols: [Vec<f64>; 9] = Default::default();
            for _ in 0..rounds {
                n += 2;
                let (r, rc) = measured(GUEST, || raw_guest(tcp, &src, &dst));
                let cached = raw(tcp, wire as usize);
                let (t, tc) = measured(GUEST, || tern(link, &src, &dst, n, false).1);
                let (ts, tsc) = measured(GUEST, || tern(link, &src, &dst, n + 1, true).1);
                for (col, v) in cols
                    .iter_mut()
                    .zip([r, cached, t, t / r, ts, ts / r, rc, tc, tsc])
                {
                    col.push(v);
                }
            }
            let m: Vec<f64> = cols.iter_mut().map(|c| median(c)).collect();
            println!(
                "{:>9} {:>9.0} {:>9.0} {:>9.0} {:>7.2} {:>9.0} {:>7.2} {:>12.2} {:>12.2} {:>12.2}",
                name,
                m[0] / 1e6,
                m[1] / 1e6,
                m[2] / 1e6,
                m[3],
                m[4] / 1e6,
                m[5],
                m[6],
                m[7],
                m[8]
            );
        }
    }
    if links.contains(&Link::Tls) {
        let _ = std::fs::remove_dir_all(tls_dir());
        println!("tls: raw is plain tcp; TLS 1.3, mutual auth, one connection");
    }
    let mut load = String::new();
    let _ = std::io::Read::read_to_string(
        &mut std::fs::File::open("/proc/loadavg").expect("loadavg"),
        &mut load,
    );
    if pinned() {
        println!("pinned: sending end on CPU 0, receiving end on CPU 1");
    }
    if !line_rates.is_empty() {
        println!("link@NG: TCP over this bench's own loopback capped at N Gbit/s (tc tbf)");
    }
    println!(
        "load average: {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
}
