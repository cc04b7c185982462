//! A minimal MC146818 CMOS RTC: wall-clock time in BCD and 128 bytes of NVRAM. Enough for a guest
//! kernel to read the time at boot; no alarms or periodic interrupts.

use serde::{Deserialize, Serialize};

use crate::bus::BusDevice;

/// Index port; the data port follows it.
pub const CMOS_PORT: u64 = 0x70;
/// Ports decoded: 0x70 (index) and 0x71 (data).
pub const CMOS_PORT_LEN: u64 = 2;

const NVRAM_LEN: usize = 128;
const REG_STATUS_A: u8 = 0x0a;
const REG_STATUS_B: u8 = 0x0b;
const REG_STATUS_D: u8 = 0x0d;
/// Status B: 24-hour mode, BCD encoding.
const STATUS_B_24H: u8 = 1 << 1;
/// Status D: RAM and time are valid.
const STATUS_D_VRT: u8 = 1 << 7;

/// The RTC's guest-visible state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CmosState {
    pub index: u8,
    pub nvram: Vec<u8>,
}

/// The CMOS RTC.
#[derive(Debug)]
pub struct Cmos {
    index: u8,
    nvram: [u8; NVRAM_LEN],
}

impl Default for Cmos {
    fn default() -> Self {
        let mut nvram = [0u8; NVRAM_LEN];
        nvram[usize::from(REG_STATUS_A)] = 0x26; // 32.768 kHz base, 1.024 kHz rate; UIP clear
        nvram[usize::from(REG_STATUS_B)] = STATUS_B_24H;
        nvram[usize::from(REG_STATUS_D)] = STATUS_D_VRT;
        Self { index: 0, nvram }
    }
}

fn bcd(v: u64) -> u8 {
    // Each field is < 100, so both digits fit a nibble.
    (((v / 10 % 10) << 4) | (v % 10)) as u8
}

/// Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u64, u64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u64;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u64;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

impl Cmos {
    /// A powered-on RTC.
    pub fn new() -> Self {
        Self::default()
    }

    /// The RTC's state.
    pub fn save(&self) -> CmosState {
        CmosState {
            index: self.index,
            nvram: self.nvram.to_vec(),
        }
    }

    /// An RTC with `state`; NVRAM of the wrong size is refused.
    pub fn restore(state: &CmosState) -> Result<Self, CmosRestoreError> {
        let nvram = state
            .nvram
            .as_slice()
            .try_into()
            .map_err(|_| CmosRestoreError {
                len: state.nvram.len(),
            })?;
        Ok(Self {
            index: state.index,
            nvram,
        })
    }

    fn time_register(&self, reg: u8) -> Option<u8> {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let days = (secs / 86_400) as i64;
        let (year, month, day) = civil_from_days(days);
        let tod = secs % 86_400;
        let weekday = ((days + 4).rem_euclid(7) + 1) as u64; // 1970-01-01 was a Thursday
        let year = year.max(0) as u64;
        Some(match reg {
            0x00 => bcd(tod % 60),
            0x02 => bcd(tod / 60 % 60),
            0x04 => bcd(tod / 3600),
            0x06 => bcd(weekday),
            0x07 => bcd(day),
            0x08 => bcd(month),
            0x09 => bcd(year % 100),
            0x32 => bcd(year / 100),
            _ => return None,
        })
    }
}

/// Restoring the RTC failed.
#[derive(Debug, thiserror::Error)]
#[error("cmos nvram must be {NVRAM_LEN} bytes, got {len}")]
pub struct CmosRestoreError {
    len: usize,
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let [byte] = data else {
            data.fill(0xff);
            return;
        };
        *byte = match offset {
            0 => self.index,
            _ => {
                let reg = self.index & 0x7f;
                self.time_register(reg)
                    .unwrap_or(self.nvram[usize::from(reg)])
            }
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [value] = data else { return };
        match offset {
            // Bit 7 of the index port is the NMI mask, not part of the index.
            0 => self.index = value & 0x7f,
            _ => {
                let reg = self.index & 0x7f;
                if self.time_register(reg).is_none() && reg != REG_STATUS_D {
                    self.nvram[usize::from(reg)] = *value;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_reg(cmos: &mut Cmos, reg: u8) -> u8 {
        cmos.write(0, &[reg]);
        let mut b = [0u8];
        cmos.read(1, &mut b);
        b[0]
    }

    #[test]
    fn civil_from_days_known_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
    }

    #[test]
    fn cmos_reports_bcd_time_and_keeps_nvram() {
        let mut cmos = Cmos::new();
        let century = read_reg(&mut cmos, 0x32);
        assert_eq!(century, 0x20);
        let month = read_reg(&mut cmos, 0x08);
        assert!((0x01..=0x12).contains(&month) && month & 0xf <= 9);
        assert_eq!(read_reg(&mut cmos, REG_STATUS_D), STATUS_D_VRT);
        cmos.write(0, &[0x40]);
        cmos.write(1, &[0xab]);
        assert_eq!(read_reg(&mut cmos, 0x40), 0xab);
        let restored = Cmos::restore(&cmos.save()).unwrap();
        assert_eq!(restored.nvram[0x40], 0xab);
        assert!(Cmos::restore(&CmosState {
            index: 0,
            nvram: vec![0; 3]
        })
        .is_err());
    }
}
