//! PC platform devices every tern VM has: COM1, the i8042 reset line, a CMOS RTC and the ACPI sleep
//! control register used for power-off.

pub mod cmos;
pub mod i8042;
pub mod power;
pub mod serial;

use vmm_sys_util::eventfd::EventFd;

/// A [`vm_superio::Trigger`] over an [`EventFd`]: used as a KVM irqfd (serial IRQ) or as a VMM event
/// (reset, power-off).
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// Wraps `fd`.
    pub fn new(fd: EventFd) -> Self {
        Self(fd)
    }
}

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
