//! [`KvmDirtyLog`]: the KVM dirty bitmap as a [`DirtySource`], cleared chunk by chunk right before
//! the engine reads the chunk's pages (manual protection).
//!
//! ```text
//! start : KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2, ENABLE | INITIALLY_SET)  (when offered)
//!         slots get KVM_MEM_LOG_DIRTY_PAGES, then a first sync
//! sync  : KVM_GET_DIRTY_LOG per slot → snapshot          (manual: reads only, kernel keeps bits)
//! peek  : snapshot ∩ range → out
//! claim : snapshot ∩ range → out; KVM_CLEAR_DIRTY_LOG(exactly those bits, 64-page aligned words)
//!         → KVM write-protects those pages again; the bits leave the snapshot
//! stop  : slots lose KVM_MEM_LOG_DIRTY_PAGES
//! ```
//!
//! A page written after its claim faults, KVM sets its bit again, and the next sync reports it.
//! A page written between sync and claim is already dirty at the kernel; the claim clears only bits
//! the snapshot had, so a page dirtied *for the first time* after the sync keeps its kernel bit and
//! comes back next iteration (sent twice at worst, never lost).
//!
//! # INITIALLY_SET and the engine's iteration 0
//! With `KVM_DIRTY_LOG_INITIALLY_SET`, turning logging on does not write-protect the guest: every
//! bit starts set and a page is only armed when its bit is first cleared. The engine's iteration 0
//! sends every page after a `claim` of each chunk *without* a preceding `sync`; so `start` ends with
//! a sync of its own, and iteration 0's claims take (and clear) the all-ones bits of each chunk
//! just before sending it. Without that, iteration 1 would resend the whole guest.
//!
//! # Without manual protection
//! Hosts without `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` get [`LogMode::GetAndClear`]: `KVM_GET_DIRTY_LOG`
//! clears and re-protects the whole slot at sync, so bits are ORed into the snapshot there and
//! `claim` only hands the snapshot's bits over. Correct, but a page dirtied between sync and its
//! chunk's send is sent in this iteration *and* the next one.

use std::sync::Arc;

use tern_migration::dirty::{DirtyBitmap, DirtySource, DirtySourceError, GpaRange, SourceKind};

use super::snapshot::SlotSnapshot;
use crate::sys::kvm_dirty_log::{
    clear_dirty_log, enable_manual_protect, supported_manual_protect_flags,
    wanted_manual_protect_flags, KvmDirtyLogError,
};
use crate::vstate::memory::GuestRam;
use crate::vstate::vm::{Vm, VmError};

/// How KVM's dirty bitmap is read and cleared on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogMode {
    /// Manual protection: GET reads, CLEAR clears just before sending.
    ManualProtect {
        /// Logging starts with every bit set (no up-front write-protection of the guest).
        initially_set: bool,
    },
    /// No manual protection on this host: GET reads and clears the whole slot at sync.
    GetAndClear,
}

impl std::fmt::Display for LogMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LogMode::ManualProtect {
                initially_set: true,
            } => f.write_str("manual-protect + initially-set (KVM_CLEAR_DIRTY_LOG per chunk)"),
            LogMode::ManualProtect {
                initially_set: false,
            } => f.write_str("manual-protect (KVM_CLEAR_DIRTY_LOG per chunk)"),
            LogMode::GetAndClear => {
                f.write_str("get-and-clear (no KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 on this host)")
            }
        }
    }
}

/// Errors of the KVM dirty-log source (boxed as the cause of a [`DirtySourceError`]).
#[derive(Debug, thiserror::Error)]
pub enum KvmLogError {
    /// Turning KVM_MEM_LOG_DIRTY_PAGES on or off failed.
    #[error("cannot turn dirty logging {}", if *enabled { "on" } else { "off" })]
    Logging {
        /// The wanted state.
        enabled: bool,
        /// Why.
        #[source]
        source: VmError,
    },
    /// KVM_GET_DIRTY_LOG failed.
    #[error("KVM_GET_DIRTY_LOG slot {slot}")]
    GetDirtyLog {
        /// Memory slot.
        slot: u32,
        /// errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A slot is too large for this host's address space.
    #[error("memory slot {slot} of {len_bytes} bytes does not fit this host's address space")]
    SlotTooLarge {
        /// Memory slot.
        slot: u32,
        /// Its length.
        len_bytes: u64,
    },
    /// Manual protection or KVM_CLEAR_DIRTY_LOG failed.
    #[error(transparent)]
    ManualProtect(#[from] KvmDirtyLogError),
}

/// The KVM dirty bitmap of every RAM slot as one dirty source.
#[derive(Debug)]
pub struct KvmDirtyLog {
    vm: Arc<Vm>,
    mode: LogMode,
    manual_flags: u64,
    slots: Vec<SlotSnapshot>,
    started: bool,
}

impl KvmDirtyLog {
    /// A source over the RAM slots of `vm` (slot i = RAM range i of `ram`). Probes the host's
    /// manual-protection support; nothing is enabled until [`DirtySource::start`].
    pub fn new(vm: Arc<Vm>, ram: &GuestRam) -> Self {
        let manual_flags = wanted_manual_protect_flags(supported_manual_protect_flags(vm.fd()));
        let mode = if manual_flags == 0 {
            LogMode::GetAndClear
        } else {
            LogMode::ManualProtect {
                initially_set: manual_flags & u64::from(kvm_bindings::KVM_DIRTY_LOG_INITIALLY_SET)
                    != 0,
            }
        };
        let slots = super::snapshot::slots_for(ram);
        Self {
            vm,
            mode,
            manual_flags,
            slots,
            started: false,
        }
    }

    /// A source that does not use manual protection even where the host offers it: the
    /// [`LogMode::GetAndClear`] fallback, for hosts without KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 and
    /// for tests and benchmarks that compare both modes on one host. Manual protection is a
    /// VM-wide setting, so it must not be mixed with a manual-protect source on the same VM.
    pub fn new_get_and_clear(vm: Arc<Vm>, ram: &GuestRam) -> Self {
        let mut s = Self::new(vm, ram);
        s.mode = LogMode::GetAndClear;
        s.manual_flags = 0;
        s
    }

    /// The mode this host allows (fixed at construction).
    pub fn mode(&self) -> LogMode {
        self.mode
    }

    fn err_start(e: KvmLogError) -> DirtySourceError {
        DirtySourceError::Start {
            kind: SourceKind::Kvm,
            source: Box::new(e),
        }
    }

    fn check_started(&self) -> Result<(), DirtySourceError> {
        if self.started {
            Ok(())
        } else {
            Err(DirtySourceError::NotStarted {
                kind: SourceKind::Kvm,
            })
        }
    }

    fn fetch(&mut self) -> Result<(), KvmLogError> {
        for s in &mut self.slots {
            let len = usize::try_from(s.len_bytes()).map_err(|_| KvmLogError::SlotTooLarge {
                slot: s.slot(),
                len_bytes: s.len_bytes(),
            })?;
            let bits = self
                .vm
                .fd()
                .get_dirty_log(s.slot(), len)
                .map_err(|source| KvmLogError::GetDirtyLog {
                    slot: s.slot(),
                    source,
                })?;
            match self.mode {
                LogMode::ManualProtect { .. } => s.replace(bits),
                LogMode::GetAndClear => s.or_kernel(&bits),
            }
        }
        Ok(())
    }
}

impl DirtySource for KvmDirtyLog {
    fn kind(&self) -> SourceKind {
        SourceKind::Kvm
    }

    fn label(&self) -> &str {
        "kvm-log"
    }

    fn start(&mut self) -> Result<(), DirtySourceError> {
        if self.manual_flags != 0 {
            enable_manual_protect(self.vm.fd(), self.manual_flags)
                .map_err(|e| Self::err_start(e.into()))?;
        }
        self.vm.set_dirty_logging(true).map_err(|source| {
            Self::err_start(KvmLogError::Logging {
                enabled: true,
                source,
            })
        })?;
        for s in &mut self.slots {
            s.clear();
        }
        self.started = true;
        log::info!("KVM dirty log: {}", self.mode);
        // See the module docs: iteration 0 claims without a sync.
        self.fetch().map_err(Self::err_start)
    }

    fn stop(&mut self) -> Result<(), DirtySourceError> {
        self.started = false;
        for s in &mut self.slots {
            s.clear();
        }
        self.vm
            .set_dirty_logging(false)
            .map_err(|source| DirtySourceError::Stop {
                kind: SourceKind::Kvm,
                source: Box::new(KvmLogError::Logging {
                    enabled: false,
                    source,
                }),
            })
    }

    fn sync(&mut self) -> Result<(), DirtySourceError> {
        self.check_started()?;
        self.fetch().map_err(|e| DirtySourceError::Sync {
            kind: SourceKind::Kvm,
            source: Box::new(e),
        })
    }

    fn peek(&mut self, range: GpaRange, out: &mut DirtyBitmap) -> Result<bool, DirtySourceError> {
        self.check_started()?;
        super::snapshot::peek_slots(&self.slots, range, out)?;
        Ok(true)
    }

    fn claim(&mut self, range: GpaRange, out: &mut DirtyBitmap) -> Result<(), DirtySourceError> {
        self.check_started()?;
        for s in &mut self.slots {
            let Some((first, end)) = s.page_span(range) else {
                continue;
            };
            let taken = s.take_span(first, end);
            if taken.is_empty() {
                continue;
            }
            // Hand the bits over first: if `out` cannot take them, nothing has been cleared.
            s.or_taken_into(&taken, first, end, out).map_err(|source| {
                DirtySourceError::OutputBitmap {
                    kind: SourceKind::Kvm,
                    range,
                    source,
                }
            })?;
            if let LogMode::ManualProtect { .. } = self.mode {
                clear_dirty_log(
                    self.vm.fd(),
                    s.slot(),
                    s.pages(),
                    taken.first_page,
                    taken.num_pages,
                    &taken.words,
                )
                .map_err(|e| DirtySourceError::Claim {
                    kind: SourceKind::Kvm,
                    range,
                    source: Box::new(KvmLogError::from(e)),
                })?;
            }
            s.remove(&taken);
        }
        Ok(())
    }
}
