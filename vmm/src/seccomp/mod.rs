//! seccomp filters, one per kind of thread, installed by each thread as it starts.
//!
//! A filter belongs to a thread and is inherited by the threads it starts; a thread that installs a
//! filter of its own under an inherited one gets the intersection. So a kind that starts threads of
//! another kind allows what those need: the API server starts migrations, migrations build and run
//! VMs (vCPU and helper threads). vCPU threads, the narrowest kind, open nothing, connect nowhere and
//! start nothing. The main thread installs its filter last, once it has started its children.
//!
//! What a filtered thread may not do fails with `EPERM` (the call is not made). tern does not kill
//! on a forbidden call: a syscall missing from a list on some rare error path then fails that path
//! (a migration fails, the VM keeps running here) instead of killing the VM, and the confinement is
//! the same — the call never happens. `--seccomp log` lets every call through and has the kernel log
//! the ones outside the lists (`dmesg`, audit type 1326) to find missing ones.
//!
//! Other crates start threads too (`tern-api`'s server thread, the mock-DMA simulator); they take a
//! plain `fn()` to run first, see [`install_api`] and [`install_device`].

mod api;
mod base;
mod device;
mod ioctl;
mod main_thread;
mod migration;
mod vcpu;

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::OnceLock;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// `--seccomp`: whether tern's threads run under their filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeccompMode {
    /// Filters on; a call outside a thread's list fails with EPERM.
    #[default]
    On,
    /// No filters.
    Off,
    /// Filters on, but a call outside a list is allowed and logged by the kernel.
    Log,
}

impl FromStr for SeccompMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "true" | "on" => Ok(SeccompMode::On),
            "false" | "off" => Ok(SeccompMode::Off),
            "log" => Ok(SeccompMode::Log),
            other => Err(format!("{other:?}: expected true, false or log")),
        }
    }
}

/// The kinds of thread with a filter of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ThreadKind {
    /// A vCPU thread.
    Vcpu,
    /// The API server thread (its handler threads inherit it).
    Api,
    /// A migration engine thread, source or destination (its lane threads inherit it).
    Migration,
    /// A device or helper thread: mock-DMA simulator, auto-converge throttle.
    Device,
    /// The main thread, after start-up.
    Main,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 5] = [
        ThreadKind::Vcpu,
        ThreadKind::Api,
        ThreadKind::Migration,
        ThreadKind::Device,
        ThreadKind::Main,
    ];

    /// The syscalls this kind may make.
    pub fn allowed_syscalls(self) -> Vec<i64> {
        let mut v = base::syscalls();
        match self {
            ThreadKind::Vcpu => v.extend(vcpu::syscalls()),
            ThreadKind::Device => v.extend(device::syscalls()),
            ThreadKind::Migration => {
                v.extend(base::spawn_syscalls());
                v.extend(migration::syscalls());
            }
            ThreadKind::Api => {
                v.extend(base::spawn_syscalls());
                v.extend(api::syscalls());
            }
            ThreadKind::Main => {
                v.extend(base::spawn_syscalls());
                v.extend(main_thread::syscalls());
            }
        }
        v.sort_unstable();
        v.dedup();
        v
    }

    /// The ioctl requests this kind may make (`ioctl` is in every kind's syscall list, always
    /// with these conditions).
    fn allowed_ioctls(self) -> Vec<ioctl::IoctlAllow> {
        let mut v = match self {
            ThreadKind::Vcpu => vcpu::ioctls(),
            ThreadKind::Device => device::ioctls(),
            ThreadKind::Migration => migration::ioctls(),
            ThreadKind::Api => api::ioctls(),
            ThreadKind::Main => main_thread::ioctls(),
        };
        v.dedup();
        v
    }

    /// This kind's filter compiled for `mode` (`None` when filters are off).
    pub fn compile(self, mode: SeccompMode) -> Result<Option<BpfProgram>, SeccompError> {
        let mismatch = match mode {
            SeccompMode::Off => return Ok(None),
            SeccompMode::On => SeccompAction::Errno(libc::EPERM as u32),
            SeccompMode::Log => SeccompAction::Log,
        };
        let compile_err = |e: seccompiler::BackendError| SeccompError::Compile(self, e.into());
        let mut rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = BTreeMap::new();
        for nr in self.allowed_syscalls() {
            // An empty rule list matches every call of `nr`; ioctl matches only its requests.
            let conditions = if nr == libc::SYS_ioctl {
                self.allowed_ioctls()
                    .into_iter()
                    .map(|a| a.rule().map_err(compile_err))
                    .collect::<Result<Vec<_>, _>>()?
            } else {
                Vec::new()
            };
            rules.insert(nr, conditions);
        }
        let arch = TargetArch::try_from(std::env::consts::ARCH)
            .map_err(|e| SeccompError::Compile(self, e.into()))?;
        let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch)
            .map_err(|e| SeccompError::Compile(self, e.into()))?;
        let prog =
            BpfProgram::try_from(filter).map_err(|e| SeccompError::Compile(self, e.into()))?;
        Ok(Some(prog))
    }
}

/// Building or installing a filter failed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp: cannot build the {0:?} filter")]
    Compile(ThreadKind, #[source] seccompiler::Error),
    #[error("seccomp: cannot install the {0:?} filter (run with --seccomp false on a kernel without seccomp)")]
    Install(ThreadKind, #[source] seccompiler::Error),
    #[error("seccomp: the filter check thread failed")]
    Check,
}

/// The compiled filters of this process, set once by [`init`].
#[derive(Debug)]
struct Filters {
    mode: SeccompMode,
    progs: BTreeMap<ThreadKind, BpfProgram>,
}

static FILTERS: OnceLock<Filters> = OnceLock::new();

/// Compiles every kind's filter for `mode` and checks, on a throwaway thread, that the kernel takes
/// one. Until this is called, [`install`] does nothing (a library user, e.g. a test, runs
/// unfiltered). Call it once, at start-up, before any thread that installs a filter is started.
pub fn init(mode: SeccompMode) -> Result<(), SeccompError> {
    let mut progs = BTreeMap::new();
    for kind in ThreadKind::ALL {
        if let Some(p) = kind.compile(mode)? {
            progs.insert(kind, p);
        }
    }
    if let Some(p) = progs.get(&ThreadKind::Vcpu).cloned() {
        std::thread::Builder::new()
            .name("tern-seccomp-check".into())
            .spawn(move || seccompiler::apply_filter(&p))
            .map_err(|_| SeccompError::Check)?
            .join()
            .map_err(|_| SeccompError::Check)?
            .map_err(|e| SeccompError::Install(ThreadKind::Vcpu, e))?;
    }
    let _ = FILTERS.set(Filters { mode, progs });
    Ok(())
}

/// The mode [`init`] set (`Off` before it).
pub fn mode() -> SeccompMode {
    FILTERS.get().map_or(SeccompMode::Off, |f| f.mode)
}

/// Installs `kind`'s filter on the calling thread (and so on every thread it starts from now on).
/// Does nothing before [`init`] or with filters off.
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    let Some(prog) = FILTERS.get().and_then(|f| f.progs.get(&kind)) else {
        return Ok(());
    };
    seccompiler::apply_filter(prog).map_err(|e| SeccompError::Install(kind, e))
}

/// [`install`] for a thread whose start cannot fail: an error is logged (the kernel took the same
/// filter at [`init`], so it does not happen in practice).
pub fn install_or_log(kind: ThreadKind) {
    if let Err(e) = install(kind) {
        log::error!("{e}");
    }
}

/// Hook for the API server thread (`tern_api::ServerOptions::thread_init`).
pub fn install_api() {
    install_or_log(ThreadKind::Api);
}

/// Hook for device threads started in `tern-devices` (the mock-DMA simulator).
pub fn install_device() {
    install_or_log(ThreadKind::Device);
}
