//! The ACPI (hardware-reduced) sleep control register: the guest writes SLP_TYP=S5 | SLP_EN to power the
//! VM off. Same port and encoding as Cloud Hypervisor, so a guest kernel's ACPI power-off works here.

use super::EventFdTrigger;
use crate::bus::BusDevice;

/// Port of the sleep control register.
pub const SLEEP_CONTROL_PORT: u64 = 0x3c0;
/// The register is one byte wide.
pub const SLEEP_CONTROL_LEN: u64 = 1;
/// SLP_EN bit.
const SLP_EN: u8 = 1 << 5;
/// SLP_TYP field (bits 2..=4) value for S5, soft-off.
const SLP_TYP_S5: u8 = 5;
/// The full byte a guest writes to power off.
pub const POWER_OFF_VALUE: u8 = (SLP_TYP_S5 << 2) | SLP_EN;

/// Signals `power_off` when the guest requests S5.
#[derive(Debug)]
pub struct SleepControl {
    power_off: EventFdTrigger,
}

impl SleepControl {
    /// A register that signals `power_off` on an S5 request.
    pub fn new(power_off: EventFdTrigger) -> Self {
        Self { power_off }
    }
}

impl BusDevice for SleepControl {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let [value] = data else { return };
        let slp_typ = (value >> 2) & 0x7;
        if value & SLP_EN != 0 && slp_typ == SLP_TYP_S5 {
            if let Err(e) = vm_superio::Trigger::trigger(&self.power_off) {
                log::error!("power-off signal failed: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use super::*;

    #[test]
    fn sleep_control_powers_off_only_on_s5_with_slp_en() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut dev = SleepControl::new(EventFdTrigger::new(evt.try_clone().unwrap()));
        dev.write(0, &[SLP_TYP_S5 << 2]); // no SLP_EN
        dev.write(0, &[(3 << 2) | SLP_EN]); // S3 is not power-off
        assert!(evt.read().is_err());
        dev.write(0, &[POWER_OFF_VALUE]);
        assert_eq!(evt.read().unwrap(), 1);
    }
}
