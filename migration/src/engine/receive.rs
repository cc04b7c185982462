//! The destination side: accept the source's connections, build the VM from its config, write
//! memory frames (one thread per extra connection), restore state after every data connection
//! ended, start the VM and acknowledge. Any failure is reported to the source as an Error frame
//! carrying the reason, and the half-built VM is dropped.

use std::fs::File;
use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice};

use crate::protocol::{
    read_preamble, write_preamble, Frame, FrameReader, FrameWriter, Hello, ProtocolError, Received,
    HEADER_BYTES, MEMORY_ENTRY_BYTES,
};
use crate::transport::{
    Connection, FdReader, MigrationListener, MigrationUrl, TlsError, TransportError,
};

use super::device_sinks::DeviceSinks;
use super::error::{error_chain, MigrationError};
use super::host::{
    HandoverFd, LocalRegion, MigrationState, MigrationTarget, MigrationTargetFactory,
};
use super::in_doubt::InDoubtVm;
use super::pages::PageWriter;
use super::prefault::Prefaulter;
use super::stats::{MigrationStats, MigrationStatus};
use super::steps::StepTimes;

/// Listen on `url`, receive one migration, and return the started VM.
pub fn receive(
    url: &MigrationUrl,
    factory: &mut dyn MigrationTargetFactory,
    stats: &MigrationStats,
) -> Result<Box<dyn MigrationTarget>, MigrationError> {
    let listener = MigrationListener::bind(url).map_err(MigrationError::Transport)?;
    receive_on(&listener, factory, stats)
}

/// Receive one migration on an already bound listener.
pub fn receive_on(
    listener: &MigrationListener,
    factory: &mut dyn MigrationTargetFactory,
    stats: &MigrationStats,
) -> Result<Box<dyn MigrationTarget>, MigrationError> {
    stats.begin(0);
    let cancel = Canceller {
        stats,
        conns: Mutex::new(Vec::new()),
        done: AtomicBool::new(false),
        wake: listener.url().clone(),
    };
    let result = std::thread::scope(|scope| {
        scope.spawn(|| cancel.watch());
        let r = run(listener, factory, stats, &cancel);
        cancel.done.store(true, Ordering::SeqCst);
        r
    });
    // Any failure after a cancel request is the cancel (except in doubt: that VM is held).
    let result = match result {
        Err(e @ MigrationError::InDoubt { .. }) => Err(e),
        Err(_) if stats.cancel_requested() => Err(MigrationError::Cancelled),
        r => r,
    };
    match &result {
        Ok(_) => stats.finish(MigrationStatus::Completed, None),
        Err(e @ MigrationError::InDoubt { .. }) => {
            log::error!("{}", error_chain(e));
            stats.finish(MigrationStatus::InDoubt, Some(error_chain(e)));
        }
        Err(MigrationError::Cancelled) => stats.finish(
            MigrationStatus::Cancelled,
            Some("migration cancelled".into()),
        ),
        Err(e) => {
            log::error!("incoming migration failed: {}", error_chain(e));
            stats.finish(MigrationStatus::Failed, Some(error_chain(e)));
        }
    }
    result
}

/// The control connection's reader: Unix sockets read with `recvmsg` to collect memfds.
#[derive(Debug)]
enum Incoming {
    Plain(Connection),
    Fds(FdReader),
}

impl Read for Incoming {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Incoming::Plain(c) => c.read(buf),
            Incoming::Fds(r) => r.read(buf),
        }
    }
}

impl ReadVolatile for Incoming {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        match self {
            Incoming::Plain(c) => c.read_volatile(buf),
            Incoming::Fds(r) => r.read_volatile(buf),
        }
    }
}

impl crate::transport::vectored::PlainSocket for Incoming {
    fn plain_socket(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        match self {
            Incoming::Plain(c) => c.plain_socket(),
            Incoming::Fds(r) => r.plain_socket(),
        }
    }
}

impl Incoming {
    fn take_fd(&mut self) -> Option<File> {
        match self {
            Incoming::Plain(_) => None,
            Incoming::Fds(r) => r.take_fd(),
        }
    }
}

fn proto(during: &'static str) -> impl FnOnce(ProtocolError) -> MigrationError {
    move |source| MigrationError::Protocol { during, source }
}

fn recv_error(e: ProtocolError, during: &'static str) -> MigrationError {
    match e {
        ProtocolError::Closed => MigrationError::PeerGone {
            peer: "source",
            during,
            detail: "connection closed".into(),
        },
        source => MigrationError::Protocol { during, source },
    }
}

/// Cancellation for the receiver: `MigrationStats::cancel` shuts the read side of every
/// registered connection so blocked reads end, and stops waiting for connections.
#[derive(Debug)]
struct Canceller<'a> {
    stats: &'a MigrationStats,
    conns: Mutex<Vec<Connection>>,
    done: AtomicBool,
    /// Connecting here wakes a blocking accept.
    wake: MigrationUrl,
}

impl Canceller<'_> {
    fn cancelled(&self) -> bool {
        self.stats.cancel_requested()
    }

    fn register(&self, c: &Connection) -> Result<(), MigrationError> {
        let clone = c.try_clone().map_err(MigrationError::Transport)?;
        if let Ok(mut v) = self.conns.lock() {
            v.push(clone);
        }
        // A cancel that raced the registration still takes effect.
        if self.cancelled() {
            c.shutdown_read();
        }
        Ok(())
    }

    /// Poll for cancel until the receiver finishes.
    fn watch(&self) {
        while !self.done.load(Ordering::SeqCst) {
            if self.cancelled() {
                if let Ok(v) = self.conns.lock() {
                    for c in v.iter() {
                        c.shutdown_read();
                    }
                }
                // Wake a blocking accept; it then sees the cancel. Harmless if nobody waits.
                let _ = Connection::connect(&self.wake);
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// How long to wait for the source's extra data connections after the first one.
const DATA_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Accept one connection and exchange preambles; a bad preamble is answered with an Error frame.
fn accept(
    listener: &MigrationListener,
    cancel: &Canceller<'_>,
    deadline: Option<Instant>,
) -> Result<Connection, MigrationError> {
    let c = loop {
        let accepted = match deadline {
            // The first connection may take minutes: block; a cancel wakes us by connecting.
            None => listener.accept().map(Some),
            Some(d) => {
                let stop = || cancel.cancelled() || Instant::now() >= d;
                listener.accept_until(&stop)
            }
        };
        match accepted {
            // Anyone who can reach the port could otherwise abort the receive: a peer that fails
            // TLS authentication is turned away and the listener waits for the real source.
            Err(TransportError::Tls(e @ TlsError::Handshake { .. })) if !cancel.cancelled() => {
                log::warn!("refused a connection: {}", error_chain(&e));
            }
            other => break other.map_err(MigrationError::Transport)?,
        }
    };
    if cancel.cancelled() {
        return Err(MigrationError::Cancelled);
    }
    let Some(mut c) = c else {
        return Err(MigrationError::PeerGone {
            peer: "source",
            during: "waiting for its data connections",
            detail: format!("none within {} s", DATA_CONNECT_TIMEOUT.as_secs()),
        });
    };
    cancel.register(&c)?;
    write_preamble(&mut c).map_err(proto("sending the preamble"))?;
    if let Err(e) = read_preamble(&mut c) {
        let err = MigrationError::Protocol {
            during: "reading the source's preamble",
            source: e,
        };
        let _ = FrameWriter::new(&mut c).send(&Frame::Error(&error_chain(&err)));
        return Err(err);
    }
    Ok(c)
}

fn read_hello<R: Read>(r: &mut FrameReader<R>) -> Result<Hello, MigrationError> {
    match r.recv() {
        Ok(Frame::Hello(h)) => Ok(h),
        Ok(f) => Err(MigrationError::Unexpected {
            frame: f.tag().name(),
            during: "waiting for hello",
        }),
        Err(e) => Err(recv_error(e, "waiting for hello")),
    }
}

fn memory_frame_bytes(entries: usize, data: usize) -> u64 {
    (HEADER_BYTES + 4 + entries * MEMORY_ENTRY_BYTES + data) as u64
}

/// Reads a streamed memory frame's pages from `src` into guest memory (checking each against its
/// sum, if `sums` has them) and counts the frame's wire bytes.
fn apply_streamed<S: vm_memory::ReadVolatile + crate::transport::vectored::PlainSocket>(
    pw: &mut PageWriter,
    src: &mut S,
    entries: &[crate::protocol::MemoryEntry],
    sums: &[u64],
    stats: &MigrationStats,
) -> Result<(), MigrationError> {
    let data: u64 = entries.iter().map(|e| e.data_bytes()).sum();
    pw.apply_stream(entries, sums, src)?;
    stats.add_transferred(
        memory_frame_bytes(entries.len(), data as usize)
            + (sums.len() * crate::protocol::page_sum::PAGE_SUM_BYTES) as u64,
    );
    Ok(())
}

/// One extra data connection: memory and device frames until StreamEnd.
fn data_lane(
    r: &mut FrameReader<Connection>,
    pw: &mut PageWriter,
    stats: &MigrationStats,
    devices: &DeviceSinks,
) -> Result<(), MigrationError> {
    loop {
        match r.recv_streaming() {
            Ok(Received::MemoryStream(entries)) => {
                apply_streamed(pw, r.get_mut(), &entries, &[], stats)?;
            }
            Ok(Received::MemoryStreamSummed(entries, sums)) => {
                apply_streamed(pw, r.get_mut(), &entries, &sums, stats)?;
            }
            Ok(Received::Frame(Frame::Memory { entries, data })) => {
                pw.apply(&entries, data)?;
                stats.add_transferred(memory_frame_bytes(entries.len(), data.len()));
            }
            // This connection's pages are all here: any still torn was damaged, not rewritten.
            Ok(Received::Frame(Frame::StreamEnd)) => return pw.check_torn(),
            Ok(Received::Frame(Frame::Error(reason))) => {
                return Err(MigrationError::PeerError {
                    peer: "source",
                    reason: reason.to_owned(),
                })
            }
            Ok(Received::Frame(f)) => {
                if !devices.handle(&f, stats)? {
                    return Err(MigrationError::Unexpected {
                        frame: f.tag().name(),
                        during: "receiving memory on a data connection",
                    });
                }
            }
            Err(e) => return Err(recv_error(e, "receiving memory on a data connection")),
        }
    }
}

fn run(
    listener: &MigrationListener,
    factory: &mut dyn MigrationTargetFactory,
    stats: &MigrationStats,
    cancel: &Canceller<'_>,
) -> Result<Box<dyn MigrationTarget>, MigrationError> {
    let mut clock = StepTimes::sequence();
    let control = accept(listener, cancel, None)?;
    clock.lap("wait for the source to connect");
    let writer = control.try_clone().map_err(MigrationError::Transport)?;
    let mut w = FrameWriter::new(writer);
    let result = run_control(listener, &control, factory, stats, cancel, clock);
    match result {
        Ok((target, mut steps)) => {
            // The VM runs here now, whatever happens to this ack: a source that does not get it
            // stays paused, in doubt, and the operator stops it.
            if let Err(e) = w.send(&Frame::Ack) {
                log::warn!(
                    "the VM runs here, but the final ack did not reach the source: {}",
                    error_chain(&e)
                );
            }
            steps.lap("ack sent");
            stats.set_switchover_steps(steps.take());
            Ok(target)
        }
        // The source may have committed and stopped: say nothing that could make it resume.
        Err(e @ MigrationError::InDoubt { .. }) => {
            control.shutdown();
            Err(e)
        }
        Err(e) => {
            let e = if cancel.cancelled() {
                MigrationError::Cancelled
            } else {
                e
            };
            // Tell the source why; it resumes its VM. It may already be gone.
            let _ = w.send(&Frame::Error(&format!("destination: {}", error_chain(&e))));
            control.shutdown();
            Err(e)
        }
    }
}

fn run_control(
    listener: &MigrationListener,
    control: &Connection,
    factory: &mut dyn MigrationTargetFactory,
    stats: &MigrationStats,
    cancel: &Canceller<'_>,
    mut clock: StepTimes,
) -> Result<(Box<dyn MigrationTarget>, StepTimes), MigrationError> {
    let reader = control.try_clone().map_err(MigrationError::Transport)?;
    let incoming = match reader {
        Connection::Unix(u) => Incoming::Fds(FdReader::new(u)),
        c @ Connection::Tcp(_) => Incoming::Plain(c),
    };
    let mut r = FrameReader::new(incoming);
    let hello = read_hello(&mut r)?;
    clock.lap("handshake");
    if hello.connection_index != 0 {
        return Err(MigrationError::InvalidParams {
            reason: format!(
                "first connection has index {}, expected 0",
                hello.connection_index
            ),
        });
    }
    if hello.local && control.as_unix().is_none() {
        return Err(MigrationError::InvalidParams {
            reason: "local migration over tcp".into(),
        });
    }
    // The source opens every data connection before sending config.
    let mut data: Vec<Option<FrameReader<Connection>>> =
        (0..hello.connections).map(|_| None).collect();
    let mut data_conns = Vec::new();
    let deadline = Instant::now() + DATA_CONNECT_TIMEOUT;
    for _ in 1..hello.connections {
        let c = accept(listener, cancel, Some(deadline))?;
        data_conns.push(c.try_clone().map_err(MigrationError::Transport)?);
        let mut dr = FrameReader::new(c);
        let h = read_hello(&mut dr)?;
        if h.session != hello.session {
            return Err(MigrationError::Session {
                index: h.connection_index,
                got: h.session,
                expected: hello.session,
            });
        }
        let slot = data
            .get_mut(usize::from(h.connection_index))
            .filter(|s| s.is_none() && h.connection_index != 0)
            .ok_or(MigrationError::InvalidParams {
                reason: format!("duplicate or bad connection index {}", h.connection_index),
            })?;
        *slot = Some(dr);
    }
    if hello.connections > 1 {
        clock.lap("data connections");
    }

    // Setup: memfds and handed devices' fds (local mode), then config.
    let mut local = Vec::new();
    let mut handed = Vec::new();
    let (mut target, devices) = loop {
        match r.recv() {
            Ok(Frame::MemoryFd(info)) if hello.local => {
                let file = r.get_mut().take_fd().ok_or(MigrationError::InvalidParams {
                    reason: format!(
                        "memory-fd frame for {:#x} arrived without a file descriptor",
                        info.gpa.0
                    ),
                })?;
                let region = LocalRegion {
                    gpa: info.gpa,
                    len_bytes: info.len_bytes,
                    file,
                    file_offset: info.file_offset,
                };
                clock.lap("memory fd received");
                factory
                    .local_memory(&region)
                    .map_err(MigrationError::Host)?;
                clock.lap_split(factory.setup_steps(), "map the memory handed over (other)");
                local.push(region);
            }
            Ok(Frame::HandoverFd(meta)) if hello.local => {
                let meta = meta.to_vec();
                let file = r.get_mut().take_fd().ok_or(MigrationError::InvalidParams {
                    reason: "handover-fd frame arrived without a file descriptor".into(),
                })?;
                handed.push(HandoverFd {
                    meta,
                    fd: file.into(),
                });
            }
            Ok(Frame::Config(cfg)) => {
                clock.lap("config received");
                let handed_any = !handed.is_empty();
                factory
                    .inherit(std::mem::take(&mut handed))
                    .map_err(MigrationError::Host)?;
                if handed_any {
                    clock.lap("take the handed devices");
                }
                let mut target = factory
                    .create(cfg, std::mem::take(&mut local))
                    .map_err(MigrationError::Host)?;
                clock.lap_split(factory.setup_steps(), "build the VM (other)");
                // Devices that take a source device's state wait in RESUMING from now on.
                let sinks = target.device_sinks().map_err(MigrationError::Host)?;
                let writer = control.try_clone().map_err(MigrationError::Transport)?;
                let devices = DeviceSinks::begin(sinks, writer)?;
                // First ack: the VM is built. The source pauses its guest only after this, so
                // building the destination never counts as downtime.
                let writer = control.try_clone().map_err(MigrationError::Transport)?;
                if let Err(e) = FrameWriter::new(writer).send(&Frame::Ack) {
                    devices.recover();
                    return Err(proto("acknowledging the config")(e));
                }
                clock.lap("device sinks and ack");
                clock.record_before(factory.prebuilt_steps());
                stats.set_setup_steps(clock.steps());
                break (target, devices);
            }
            Ok(Frame::Error(reason)) => {
                return Err(MigrationError::PeerError {
                    peer: "source",
                    reason: reason.to_owned(),
                })
            }
            Ok(f) => {
                return Err(MigrationError::Unexpected {
                    frame: f.tag().name(),
                    during: "waiting for config",
                })
            }
            Err(e) => return Err(recv_error(e, "waiting for config")),
        }
    };
    let result = receive_state(
        &mut target,
        &devices,
        &mut r,
        data,
        &data_conns,
        control,
        stats,
    );
    let steps = match result {
        Ok(steps) => steps,
        Err(e) => {
            // No device keeps a partial state; the half-built VM is dropped by the caller.
            devices.recover();
            return Err(e);
        }
    };
    await_commit(control, &mut r, target, devices, steps, stats)
}

/// How long the destination waits for the source's Commit after its Ready.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(60);

/// Phase two: tell the source this side can run the VM, and run it only on its Commit. The
/// source's Error means it resumed (drop the VM); a lost link means it may have committed or not:
/// the VM is held paused, in doubt, for the operator. `steps` times the switchover on.
fn await_commit(
    control: &Connection,
    r: &mut FrameReader<Incoming>,
    mut target: Box<dyn MigrationTarget>,
    devices: DeviceSinks,
    mut steps: StepTimes,
    stats: &MigrationStats,
) -> Result<(Box<dyn MigrationTarget>, StepTimes), MigrationError> {
    let writer = control.try_clone().map_err(MigrationError::Transport);
    if let Err(e) = writer.and_then(|w| {
        FrameWriter::new(w)
            .send(&Frame::Ready)
            .map_err(proto("telling the source this side is ready"))
    }) {
        // A Ready that did not go out whole cannot have been taken for one: the source resumes.
        devices.recover();
        return Err(e);
    }
    steps.lap("ready sent");
    let _ = control.set_read_timeout(Some(COMMIT_TIMEOUT));
    let in_doubt = |detail: String, target, devices| MigrationError::InDoubt {
        detail,
        held: Some(Box::new(InDoubtVm::new(target, devices))),
    };
    match r.recv() {
        Ok(Frame::Commit) => {
            steps.lap("wait for commit");
        }
        Ok(Frame::Error(reason)) => {
            devices.recover();
            return Err(MigrationError::PeerError {
                peer: "source",
                reason: reason.to_owned(),
            });
        }
        Ok(f) => {
            let detail = format!("the source sent {} instead of commit", f.tag().name());
            return Err(in_doubt(detail, target, devices));
        }
        Err(e) => {
            let detail = format!(
                "the link was lost after this side's ready: {}",
                error_chain(&e)
            );
            return Err(in_doubt(detail, target, devices));
        }
    }
    // Committed: the source has stopped for good. Devices first, then the vCPUs.
    let started = devices
        .run()
        .and_then(|()| {
            steps.lap("devices running");
            // Stamped as the vCPUs are let go (as QEMU's RESUME event is), not after: a vCPU
            // that takes this core at once must not count as time stood still.
            stats.mark_resumed();
            target.start().map_err(MigrationError::Host)
        })
        .map(|()| steps.lap_split(target.switchover_steps(), "start (other)"));
    if let Err(e) = started {
        devices.recover();
        return Err(e);
    }
    Ok((target, steps))
}

/// Memory, device data and state until Complete, then restore (the VM starts on Commit).
fn receive_state(
    target: &mut Box<dyn MigrationTarget>,
    devices: &DeviceSinks,
    r: &mut FrameReader<Incoming>,
    mut data: Vec<Option<FrameReader<Connection>>>,
    data_conns: &[Connection],
    control: &Connection,
    stats: &MigrationStats,
) -> Result<StepTimes, MigrationError> {
    let mem = target.guest_memory();
    stats.set_total_bytes(
        vm_memory::GuestMemoryBackend::iter(&mem)
            .map(vm_memory::GuestMemoryRegion::len)
            .sum(),
    );
    stats.set_status(MigrationStatus::Active);
    stats.mark_setup_done();

    let (state, mut steps) = std::thread::scope(|scope| {
        let mut handles = Vec::new();
        for (i, slot) in data.iter_mut().enumerate() {
            let Some(mut dr) = slot.take() else { continue };
            let mut pw = PageWriter::new(mem.clone())?;
            let wake = control.try_clone().map_err(MigrationError::Transport)?;
            handles.push((
                i,
                scope.spawn(move || {
                    let res = data_lane(&mut dr, &mut pw, stats, devices);
                    if res.is_err() {
                        // Wake the control loop so it reports this error to the source.
                        wake.shutdown_read();
                    }
                    res
                }),
            ));
        }
        let mut pw = PageWriter::new(mem.clone())?;
        let mut prefault = Prefaulter::default();
        let control_result = control_loop(r, &mut pw, &mut prefault, stats, devices);
        // The switchover's clock here starts at the source's Complete.
        let steps = StepTimes::start();
        // Unblock data threads on failure; on success each has read StreamEnd.
        if control_result.is_err() {
            for c in data_conns {
                c.shutdown();
            }
        }
        // The source has sent every page (or the receive failed): what the helper has not
        // reached by now, the receivers fault in themselves.
        stats.set_prefaulted(prefault.stop());
        let mut lane_err = None;
        for (i, h) in handles {
            let res = h.join().unwrap_or(Err(MigrationError::Panicked));
            if let (Err(e), None) = (res, &lane_err) {
                lane_err = Some(MigrationError::Lane {
                    index: i,
                    source: Box::new(e),
                });
            }
        }
        match (control_result, lane_err) {
            // A source-reported reason explains everything; otherwise the data error is the cause.
            (Err(e @ MigrationError::PeerError { .. }), _) => Err(e),
            (_, Some(e)) => Err(e),
            (r, None) => r.map(|state| (state, steps)),
        }
    })?;
    steps.lap("data connections ended");

    stats.set_status(MigrationStatus::Completing);
    devices.check_complete()?;
    steps.lap("device state complete");
    target.restore_state(state).map_err(MigrationError::Host)?;
    steps.lap_split(target.switchover_steps(), "restore (other)");
    Ok(steps)
}

/// The most vCPU, VM and device state a source may send (each blob is one frame of at most
/// 64 MiB; a VM's real state is kilobytes per vCPU and device).
const MAX_STATE_BYTES: usize = 256 << 20;

/// Refuses a second blob for the same part of the VM, or state past [`MAX_STATE_BYTES`]: a
/// source could otherwise make the receiver hold any number of 64 MiB frames.
fn check_state(
    state: &MigrationState,
    what: &str,
    duplicate: bool,
    len: usize,
) -> Result<(), MigrationError> {
    if duplicate {
        return Err(MigrationError::InvalidParams {
            reason: format!("the source sent the state of {what} twice"),
        });
    }
    let total = usize::try_from(state.len_bytes()).unwrap_or(usize::MAX);
    if total.saturating_add(len) > MAX_STATE_BYTES {
        return Err(MigrationError::InvalidParams {
            reason: format!(
                "the source's VM state passes {} MiB (at {what})",
                MAX_STATE_BYTES >> 20
            ),
        });
    }
    Ok(())
}

/// Memory and state on the control connection until Complete.
fn control_loop(
    r: &mut FrameReader<Incoming>,
    pw: &mut PageWriter,
    prefault: &mut Prefaulter,
    stats: &MigrationStats,
    devices: &DeviceSinks,
) -> Result<MigrationState, MigrationError> {
    let mut state = MigrationState::default();
    loop {
        let frame = match r.recv_streaming() {
            Ok(Received::MemoryStream(entries)) => {
                apply_streamed(pw, r.get_mut(), &entries, &[], stats)?;
                continue;
            }
            Ok(Received::MemoryStreamSummed(entries, sums)) => {
                apply_streamed(pw, r.get_mut(), &entries, &sums, stats)?;
                continue;
            }
            Ok(Received::Frame(f)) => Ok(f),
            Err(e) => Err(e),
        };
        match frame {
            Ok(Frame::Memory { entries, data }) => {
                pw.apply(&entries, data)?;
                stats.add_transferred(memory_frame_bytes(entries.len(), data.len()));
            }
            Ok(Frame::Populated(entries)) => {
                stats.set_populated_hint(entries.iter().map(|e| e.data_bytes()).sum());
                prefault.start(pw.memory(), entries);
            }
            Ok(Frame::VmState(b)) => {
                check_state(&state, "VM", !state.vm.is_empty(), b.len())?;
                state.vm = b.to_vec();
            }
            Ok(Frame::VcpuState { id, bytes }) => {
                let dup = state.vcpus.iter().any(|(i, _)| *i == id);
                check_state(&state, &format!("vCPU {id}"), dup, bytes.len())?;
                state.vcpus.push((id, bytes.to_vec()));
            }
            Ok(Frame::DeviceState { id, bytes }) => {
                let dup = state.devices.iter().any(|(i, _)| i == id);
                check_state(&state, &format!("device {id}"), dup, bytes.len())?;
                state.devices.push((id.to_owned(), bytes.to_vec()));
            }
            Ok(Frame::Complete) => {
                // Everything this connection carries is here (the switchover's pages included).
                pw.check_torn()?;
                return Ok(state);
            }
            Ok(Frame::Error(reason)) => {
                return Err(MigrationError::PeerError {
                    peer: "source",
                    reason: reason.to_owned(),
                })
            }
            Ok(f) => {
                if !devices.handle(&f, stats)? {
                    return Err(MigrationError::Unexpected {
                        frame: f.tag().name(),
                        during: "receiving memory and state",
                    });
                }
            }
            Err(e) => return Err(recv_error(e, "receiving memory and state")),
        }
    }
}
