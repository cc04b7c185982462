//! vCPU threads: one per vCPU, running KVM_RUN and dispatching exits to the I/O buses; paused and
//! resumed from another thread.
//!
//! Pausing: the controller sets the request, then kicks each vCPU thread with a signal until it
//! acknowledges. A signal that lands just before the thread enters KVM_RUN is lost, so the kick is
//! repeated until the acknowledgement arrives, first after 100 µs, then at doubling intervals up
//! to 2 ms: a kick is rarely lost, and a thread that is merely slow to leave KVM_RUN (its CPU
//! shared, or a nested exit) is only slowed further by signals and wake-ups every 100 µs. Once
//! paused, the thread has released its `VcpuFd` and the controller may read or write the vCPU's
//! state through [`VcpuHandle::with_fd`].

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_ioctls::{VcpuExit, VcpuFd};
use tern_devices::bus::Bus;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

/// How long to wait for a pause acknowledgement before kicking again (a kick that lands just
/// before the thread enters KVM_RUN is lost); doubled after each retry up to [`KICK_RETRY_MAX`].
const KICK_RETRY: Duration = Duration::from_micros(100);

/// The longest wait between two kicks.
const KICK_RETRY_MAX: Duration = Duration::from_millis(2);

/// Signal used to kick a vCPU thread out of KVM_RUN.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

/// Installs the (empty) kick signal handler; its only job is to make KVM_RUN return EINTR.
pub fn register_kick_signal() -> Result<(), vmm_sys_util::errno::Error> {
    extern "C" fn noop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    register_signal_handler(kick_signal(), noop)
}

/// Why a vCPU stopped running the guest for good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuStop {
    /// The guest reset or shut down the CPU (triple fault, KVM system event).
    GuestShutdown { vcpu: u8, reason: String },
    /// KVM could not run the vCPU.
    Failed { vcpu: u8, reason: String },
}

/// Receives vCPU stops (implemented by the VMM's event loop).
pub trait VcpuStopSink: Send + Sync {
    fn vcpu_stopped(&self, stop: VcpuStop);
}

/// Empties the KVM dirty rings when a vCPU exits with KVM_EXIT_DIRTY_RING_FULL (dirty-ring hook,
/// implemented by `crate::dirty::kvm_ring::DirtyRings`). The vCPU cannot re-enter the guest until
/// its ring is harvested and reset, so the vCPU thread does it itself, under the rings' own lock:
/// no waiting on another thread, so a pause request is never blocked by a full ring.
pub trait DirtyRingFullHandler: Send + Sync {
    fn dirty_ring_full(&self, vcpu: u8) -> Result<(), String>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    Run,
    Pause,
    Exit,
}

#[derive(Debug)]
struct Control {
    request: Request,
    paused: bool,
    finished: bool,
}

#[derive(Debug)]
struct Shared {
    control: Mutex<Control>,
    changed: Condvar,
    fd: Mutex<VcpuFd>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The controller's side of a vCPU thread.
#[derive(Debug)]
pub struct VcpuHandle {
    index: u8,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// What a vCPU thread needs to run.
pub struct VcpuRunner {
    pub index: u8,
    pub fd: VcpuFd,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub stop_sink: Arc<dyn VcpuStopSink>,
    /// Set when the VM uses the KVM dirty ring (`--dirty-tracking ring`).
    pub dirty_ring: Option<Arc<dyn DirtyRingFullHandler>>,
}

impl std::fmt::Debug for VcpuRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuRunner")
            .field("index", &self.index)
            .finish()
    }
}

impl VcpuHandle {
    /// Starts the vCPU thread. With `start_paused` the thread waits for [`VcpuHandle::resume`] before
    /// entering the guest (restored vCPUs start that way).
    pub fn spawn(runner: VcpuRunner, start_paused: bool) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            control: Mutex::new(Control {
                request: if start_paused {
                    Request::Pause
                } else {
                    Request::Run
                },
                paused: false,
                finished: false,
            }),
            changed: Condvar::new(),
            fd: Mutex::new(runner.fd),
        });
        let index = runner.index;
        let thread_shared = shared.clone();
        let ctx = RunContext {
            index,
            pio: runner.pio,
            mmio: runner.mmio,
            stop_sink: runner.stop_sink,
            dirty_ring: runner.dirty_ring,
        };
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                crate::seccomp::install_or_log(crate::seccomp::ThreadKind::Vcpu);
                ctx.run(&thread_shared)
            })?;
        Ok(Self {
            index,
            shared,
            thread: Some(thread),
        })
    }

    /// This vCPU's index.
    pub fn index(&self) -> u8 {
        self.index
    }

    fn kick(&self) {
        if let Some(t) = &self.thread {
            // A failed kick (thread already gone) is harmless: the wait below sees `finished`.
            let _ = t.kill(kick_signal());
        }
    }

    /// Asks the vCPU to stop running the guest; does not wait.
    pub fn request_pause(&self) {
        lock(&self.shared.control).request = Request::Pause;
        self.kick();
    }

    /// Waits until the vCPU acknowledged a pause (or its thread ended), re-kicking it meanwhile;
    /// returns how many times it kicked again.
    pub fn wait_paused(&self) -> u32 {
        let mut control = lock(&self.shared.control);
        let mut retry = KICK_RETRY;
        let mut kicks = 0;
        while !control.paused && !control.finished && control.request == Request::Pause {
            let (c, timeout) = self
                .shared
                .changed
                .wait_timeout(control, retry)
                .unwrap_or_else(|p| p.into_inner());
            control = c;
            if timeout.timed_out() && !control.paused {
                self.kick();
                kicks += 1;
                retry = (retry * 2).min(KICK_RETRY_MAX);
            }
        }
        kicks
    }

    /// Lets a paused vCPU run the guest again.
    pub fn resume(&self) {
        let mut control = lock(&self.shared.control);
        control.request = Request::Run;
        self.shared.changed.notify_all();
    }

    /// Runs `f` on the vCPU's file descriptor. Only meaningful while paused; while running it waits
    /// for the next exit.
    pub fn with_fd<R>(&self, f: impl FnOnce(&VcpuFd) -> R) -> R {
        f(&lock(&self.shared.fd))
    }

    /// Stops the thread and waits for it.
    pub fn exit(mut self) {
        self.stop_thread();
    }

    fn stop_thread(&mut self) {
        {
            let mut control = lock(&self.shared.control);
            control.request = Request::Exit;
            self.shared.changed.notify_all();
        }
        if let Some(thread) = self.thread.take() {
            while !lock(&self.shared.control).finished {
                let _ = thread.kill(kick_signal());
                std::thread::sleep(Duration::from_millis(1));
            }
            let _ = thread.join();
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

struct RunContext {
    index: u8,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    stop_sink: Arc<dyn VcpuStopSink>,
    dirty_ring: Option<Arc<dyn DirtyRingFullHandler>>,
}

enum Outcome {
    Continue,
    /// The exit was port or MMIO I/O, handled here; KVM completes the instruction (stores a
    /// read's value, moves RIP on, sends the next fragment of a split MMIO access) only on the
    /// next KVM_RUN.
    Io,
    Stop(VcpuStop),
}

impl RunContext {
    fn run(self, shared: &Shared) {
        let mut io_pending = false;
        loop {
            {
                let mut control = lock(&shared.control);
                if control.request == Request::Pause && io_pending {
                    // Paused right after an I/O exit: finish that instruction before anyone
                    // reads the state (the control lock is not held while KVM runs).
                    drop(control);
                    self.complete_io(&mut lock(&shared.fd));
                    io_pending = false;
                    continue;
                }
                while control.request == Request::Pause {
                    if !control.paused {
                        control.paused = true;
                        shared.changed.notify_all();
                    }
                    control = shared
                        .changed
                        .wait(control)
                        .unwrap_or_else(|p| p.into_inner());
                }
                control.paused = false;
                if control.request == Request::Exit {
                    break;
                }
            }
            let outcome = {
                let mut fd = lock(&shared.fd);
                self.run_once(&mut fd)
            };
            io_pending = matches!(outcome, Outcome::Io);
            if let Outcome::Stop(stop) = outcome {
                self.stop_sink.vcpu_stopped(stop);
                // Stay parked (not spinning) until the VMM tears the VM down.
                let mut control = lock(&shared.control);
                while control.request != Request::Exit {
                    control.paused = true;
                    shared.changed.notify_all();
                    control = shared
                        .changed
                        .wait(control)
                        .unwrap_or_else(|p| p.into_inner());
                }
                break;
            }
        }
        let mut control = lock(&shared.control);
        control.finished = true;
        shared.changed.notify_all();
    }

    /// Completes the instruction of the last port or MMIO exit, as KVM's API asks before the
    /// state is saved: KVM stores a read's value, moves RIP past an IN or a fast-path OUT, and
    /// sends the rest of a split MMIO access only on the next KVM_RUN, so a vCPU paused right
    /// after such an exit may still have its RIP on the instruction, and a copy restored from
    /// that state (a migration's destination) does the access again: a read consumes a second
    /// serial byte or clear-on-read status, a write is written twice. KVM_RUN with
    /// `immediate_exit` completes it and returns EINTR without entering the guest; a string or
    /// split access may need more exits before that, handled here too. On this host's KVM (PVM)
    /// an emulated OUT is already complete at its exit (the extra KVM_RUN then only returns
    /// EINTR). Tests: vmm/tests/io_completion.rs (IN here and in the lab, OUT in the lab's
    /// nested SVM).
    fn complete_io(&self, fd: &mut VcpuFd) {
        fd.set_kvm_immediate_exit(1);
        loop {
            match self.run_once(fd) {
                Outcome::Io => continue,
                Outcome::Continue => break,
                Outcome::Stop(stop) => {
                    log::warn!("vCPU {}: completing its last I/O: {stop:?}", self.index);
                    break;
                }
            }
        }
        fd.set_kvm_immediate_exit(0);
    }

    fn run_once(&self, fd: &mut VcpuFd) -> Outcome {
        let index = self.index;
        match fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                if !self.pio.read(u64::from(port), data) {
                    data.fill(0xff);
                }
                Outcome::Io
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                self.pio.write(u64::from(port), data);
                Outcome::Io
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !self.mmio.read(addr, data) {
                    data.fill(0xff);
                }
                Outcome::Io
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                self.mmio.write(addr, data);
                Outcome::Io
            }
            Ok(VcpuExit::Hlt) | Ok(VcpuExit::Intr) => Outcome::Continue,
            Ok(VcpuExit::Shutdown) => Outcome::Stop(VcpuStop::GuestShutdown {
                vcpu: index,
                reason: "triple fault / CPU shutdown".into(),
            }),
            Ok(VcpuExit::SystemEvent(kind, _)) => Outcome::Stop(VcpuStop::GuestShutdown {
                vcpu: index,
                reason: format!("KVM system event {kind}"),
            }),
            Ok(VcpuExit::FailEntry(reason, cpu)) => Outcome::Stop(VcpuStop::Failed {
                vcpu: index,
                reason: format!("KVM_RUN entry failure {reason:#x} on host cpu {cpu}"),
            }),
            Ok(VcpuExit::InternalError) => Outcome::Stop(VcpuStop::Failed {
                vcpu: index,
                reason: format!("KVM internal error at {}", describe_rip(fd)),
            }),
            Ok(VcpuExit::Unsupported(kvm_bindings::KVM_EXIT_DIRTY_RING_FULL))
                if self.dirty_ring.is_some() =>
            {
                // Dirty-ring hook: harvest + KVM_RESET_DIRTY_RINGS, then run again.
                match self.dirty_ring.as_ref().map(|r| r.dirty_ring_full(index)) {
                    Some(Err(reason)) => Outcome::Stop(VcpuStop::Failed {
                        vcpu: index,
                        reason: format!("dirty ring full and cannot be harvested: {reason}"),
                    }),
                    _ => Outcome::Continue,
                }
            }
            Ok(other) => Outcome::Stop(VcpuStop::Failed {
                vcpu: index,
                reason: format!("unhandled exit {other:?}"),
            }),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Outcome::Continue,
            Err(e) => Outcome::Stop(VcpuStop::Failed {
                vcpu: index,
                reason: format!("KVM_RUN failed: {e}"),
            }),
        }
    }
}

fn describe_rip(fd: &VcpuFd) -> String {
    match (fd.get_regs(), fd.get_sregs()) {
        (Ok(r), Ok(s)) => format!("rip={:#x} cs={:#x} cpl={}", r.rip, s.cs.selector, s.cs.dpl),
        _ => "unknown rip".into(),
    }
}
