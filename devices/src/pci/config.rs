//! A PCI function's 256-byte type-0 configuration space.
//!
//! Every dword register carries two masks: the bits the guest may write (everything else is read-only
//! and keeps the value the device model put there) and the bits that are RW1C (a guest write of 1
//! clears them, a write of 0 leaves them). Byte and word writes merge into their dword, so a guest
//! writing one byte never disturbs its neighbours. Capabilities are laid out from 0x40 upward and linked
//! from the capabilities pointer at 0x34; the "capabilities list" status bit is set with the first one.

use serde::{Deserialize, Serialize};

/// Size of the conventional configuration space.
pub const CONFIG_SPACE_BYTES: usize = 256;
/// Dword registers in the configuration space.
pub const CONFIG_REGS: usize = CONFIG_SPACE_BYTES / 4;

/// Register (dword index) of vendor and device IDs.
pub const REG_ID: usize = 0;
/// Register of command (low word) and status (high word).
pub const REG_COMMAND_STATUS: usize = 1;
/// Register of revision and class code.
pub const REG_CLASS: usize = 2;
/// Register of cache line size, latency timer, header type, BIST.
pub const REG_HEADER: usize = 3;
/// First BAR register.
pub const REG_BAR0: usize = 4;
/// Register of subsystem vendor and subsystem IDs.
pub const REG_SUBSYSTEM: usize = 11;
/// Register holding the capabilities pointer.
pub const REG_CAP_PTR: usize = 13;
/// Register of interrupt line / pin.
pub const REG_INTERRUPT: usize = 15;

/// Command register: I/O space decode enable.
pub const COMMAND_IO: u16 = 1 << 0;
/// Command register: memory space decode enable.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Command register: bus master enable.
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Command register: parity error response.
pub const COMMAND_PARITY: u16 = 1 << 6;
/// Command register: SERR# enable.
pub const COMMAND_SERR: u16 = 1 << 8;
/// Command register: INTx disable.
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Status register: the function has a capabilities list.
pub const STATUS_CAP_LIST: u16 = 1 << 4;
/// Status register: RW1C error bits (master data parity error, signaled/received target abort,
/// received master abort, signaled system error, detected parity error).
pub const STATUS_RW1C: u16 = (1 << 8) | (1 << 11) | (1 << 12) | (1 << 13) | (1 << 14) | (1 << 15);

/// First byte available to capabilities (the end of the type-0 header).
pub const CAP_START: usize = 0x40;

/// Errors building a configuration space.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigSpaceError {
    /// A capability does not fit in what is left of the 256 bytes.
    #[error(
        "capability {id:#04x} of {len_bytes} bytes does not fit (next free offset {next_free:#x})"
    )]
    CapabilityFull {
        id: u8,
        len_bytes: usize,
        next_free: usize,
    },
    /// A capability body must at least hold its ID and next pointer.
    #[error("capability {id:#04x} body of {len_bytes} bytes is shorter than its 2-byte header")]
    CapabilityTooShort { id: u8, len_bytes: usize },
    /// Saved state with the wrong number of registers.
    #[error("saved configuration space has {found} registers, expected {CONFIG_REGS}")]
    StateSize { found: usize },
}

/// Identity of a function: what the header's read-only ID fields say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciIds {
    pub vendor: u16,
    pub device: u16,
    pub revision: u8,
    /// Base class, subclass, programming interface.
    pub class: u8,
    pub subclass: u8,
    pub prog_if: u8,
    pub subsystem_vendor: u16,
    pub subsystem: u16,
}

/// The serialized configuration space (values and masks, so a restored device behaves alike).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigSpaceState {
    pub regs: Vec<u32>,
    pub write_mask: Vec<u32>,
    pub rw1c_mask: Vec<u32>,
    pub next_cap: usize,
    pub last_cap: Option<usize>,
}

/// One function's configuration space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigSpace {
    regs: [u32; CONFIG_REGS],
    write_mask: [u32; CONFIG_REGS],
    rw1c_mask: [u32; CONFIG_REGS],
    /// Next free capability offset (dword aligned).
    next_cap: usize,
    /// Offset of the last capability in the list, whose next pointer a new one is linked from.
    last_cap: Option<usize>,
}

impl ConfigSpace {
    /// A type-0 header with `ids`, the standard writable command bits, RW1C status bits and a
    /// writable interrupt line.
    pub fn new(ids: PciIds) -> Self {
        let mut c = Self {
            regs: [0; CONFIG_REGS],
            write_mask: [0; CONFIG_REGS],
            rw1c_mask: [0; CONFIG_REGS],
            next_cap: CAP_START,
            last_cap: None,
        };
        c.regs[REG_ID] = u32::from(ids.vendor) | (u32::from(ids.device) << 16);
        c.regs[REG_CLASS] = u32::from(ids.revision)
            | (u32::from(ids.prog_if) << 8)
            | (u32::from(ids.subclass) << 16)
            | (u32::from(ids.class) << 24);
        c.regs[REG_SUBSYSTEM] = u32::from(ids.subsystem_vendor) | (u32::from(ids.subsystem) << 16);
        c.write_mask[REG_COMMAND_STATUS] = u32::from(
            COMMAND_IO
                | COMMAND_MEMORY
                | COMMAND_BUS_MASTER
                | COMMAND_PARITY
                | COMMAND_SERR
                | COMMAND_INTX_DISABLE,
        );
        c.rw1c_mask[REG_COMMAND_STATUS] = u32::from(STATUS_RW1C) << 16;
        // Cache line size and latency timer are plain storage for the guest.
        c.write_mask[REG_HEADER] = 0x0000_ffff;
        // Interrupt line: scratch for the guest; the pin is read-only.
        c.write_mask[REG_INTERRUPT] = 0x0000_00ff;
        c
    }

    /// Reads dword register `reg` (0..64); out-of-range registers read as zero.
    pub fn read_reg(&self, reg: usize) -> u32 {
        self.regs.get(reg).copied().unwrap_or(0)
    }

    /// Guest write of `data` (1, 2 or 4 bytes) at byte `offset` (0..256), honouring write and RW1C
    /// masks. Writes that cross a dword or fall outside the space are ignored, as hardware does.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        let Some((reg, shift, lane)) = lane(offset, data.len()) else {
            return;
        };
        let mut value = [0u8; 4];
        value[..data.len()].copy_from_slice(data);
        let value = u32::from_le_bytes(value) << shift;
        let wmask = self.write_mask[reg] & lane;
        let cmask = self.rw1c_mask[reg] & lane;
        let old = self.regs[reg];
        self.regs[reg] = (old & !wmask) | (value & wmask);
        self.regs[reg] &= !(value & cmask);
    }

    /// Guest read of `data.len()` (1, 2 or 4) bytes at byte `offset`; bad sizes read all-ones.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        match lane(offset, data.len()) {
            Some((reg, shift, _)) => {
                let v = (self.regs[reg] >> shift).to_le_bytes();
                data.copy_from_slice(&v[..data.len()]);
            }
            None => data.fill(0xff),
        }
    }

    /// Device-model write that ignores the guest masks (read-only fields, status bits).
    pub fn set_reg(&mut self, reg: usize, value: u32) {
        if let Some(r) = self.regs.get_mut(reg) {
            *r = value;
        }
    }

    /// Replaces the guest write mask of `reg`.
    pub fn set_write_mask(&mut self, reg: usize, mask: u32) {
        if let Some(m) = self.write_mask.get_mut(reg) {
            *m = mask;
        }
    }

    /// The guest write mask of `reg`.
    pub fn write_mask(&self, reg: usize) -> u32 {
        self.write_mask.get(reg).copied().unwrap_or(0)
    }

    /// Sets RW1C bits from the device side (e.g. an error the device signals).
    pub fn set_rw1c_bits(&mut self, reg: usize, bits: u32) {
        if let (Some(r), Some(m)) = (self.regs.get_mut(reg), self.rw1c_mask.get(reg)) {
            *r |= bits & m;
        }
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        (self.regs[REG_COMMAND_STATUS] & 0xffff) as u16
    }

    /// Sets the interrupt pin (1 = INTA# .. 4 = INTD#, 0 = none).
    pub fn set_interrupt_pin(&mut self, pin: u8) {
        let r = &mut self.regs[REG_INTERRUPT];
        *r = (*r & !0xff00) | (u32::from(pin) << 8);
    }

    /// Sets the header type byte (bit 7 = multi-function).
    pub fn set_header_type(&mut self, header_type: u8) {
        let r = &mut self.regs[REG_HEADER];
        *r = (*r & !0x00ff_0000) | (u32::from(header_type) << 16);
    }

    /// Appends a capability and links it into the list. `body` is the whole capability including its
    /// two header bytes (ID and next pointer, which are overwritten); `write_mask` has the same length
    /// and says which bits of the body the guest may write. Returns the capability's offset.
    pub fn add_capability(
        &mut self,
        id: u8,
        body: &[u8],
        write_mask: &[u8],
    ) -> Result<usize, ConfigSpaceError> {
        if body.len() < 2 {
            return Err(ConfigSpaceError::CapabilityTooShort {
                id,
                len_bytes: body.len(),
            });
        }
        let offset = self.next_cap;
        let len = body.len().next_multiple_of(4);
        if offset + len > CONFIG_SPACE_BYTES {
            return Err(ConfigSpaceError::CapabilityFull {
                id,
                len_bytes: body.len(),
                next_free: offset,
            });
        }
        for (i, &b) in body.iter().enumerate() {
            let mask = write_mask.get(i).copied().unwrap_or(0);
            let b = match i {
                0 => id,
                1 => 0,
                _ => b,
            };
            // Header bytes are never guest-writable.
            let mask = if i < 2 { 0 } else { mask };
            self.set_byte(offset + i, b, mask);
        }
        match self.last_cap {
            // The next pointer of the previous capability.
            Some(prev) => self.set_byte(prev + 1, offset as u8, 0),
            None => {
                self.set_byte(REG_CAP_PTR * 4, offset as u8, 0);
                self.regs[REG_COMMAND_STATUS] |= u32::from(STATUS_CAP_LIST) << 16;
            }
        }
        self.last_cap = Some(offset);
        self.next_cap = offset + len;
        Ok(offset)
    }

    fn set_byte(&mut self, offset: usize, value: u8, mask: u8) {
        let (reg, shift) = (offset / 4, (offset % 4) * 8);
        self.regs[reg] = (self.regs[reg] & !(0xff << shift)) | (u32::from(value) << shift);
        self.write_mask[reg] =
            (self.write_mask[reg] & !(0xff << shift)) | (u32::from(mask) << shift);
    }

    /// Offsets of the capabilities in list order, walking the pointers the guest would walk. Stops at
    /// a loop or a pointer outside the device-specific area, as a careful guest does.
    pub fn capabilities(&self) -> Vec<(u8, usize)> {
        let mut out = Vec::new();
        if (self.regs[REG_COMMAND_STATUS] >> 16) as u16 & STATUS_CAP_LIST == 0 {
            return out;
        }
        let mut ptr = (self.regs[REG_CAP_PTR] & 0xfc) as usize;
        while (CAP_START..CONFIG_SPACE_BYTES).contains(&ptr) && out.len() < 48 {
            let dword = self.regs[ptr / 4] >> ((ptr % 4) * 8);
            out.push(((dword & 0xff) as u8, ptr));
            ptr = ((dword >> 8) & 0xfc) as usize;
        }
        out
    }

    /// Serializable state.
    pub fn save(&self) -> ConfigSpaceState {
        ConfigSpaceState {
            regs: self.regs.to_vec(),
            write_mask: self.write_mask.to_vec(),
            rw1c_mask: self.rw1c_mask.to_vec(),
            next_cap: self.next_cap,
            last_cap: self.last_cap,
        }
    }

    /// Rebuilds a configuration space from saved state.
    pub fn restore(state: &ConfigSpaceState) -> Result<Self, ConfigSpaceError> {
        let arr = |v: &Vec<u32>| -> Result<[u32; CONFIG_REGS], ConfigSpaceError> {
            v.as_slice()
                .try_into()
                .map_err(|_| ConfigSpaceError::StateSize { found: v.len() })
        };
        Ok(Self {
            regs: arr(&state.regs)?,
            write_mask: arr(&state.write_mask)?,
            rw1c_mask: arr(&state.rw1c_mask)?,
            next_cap: state.next_cap.clamp(CAP_START, CONFIG_SPACE_BYTES),
            last_cap: state.last_cap.filter(|&o| o < CONFIG_SPACE_BYTES - 1),
        })
    }
}

/// For an access of `len` bytes at `offset`: the dword register, the bit shift inside it and the
/// mask of the bytes touched. `None` for sizes other than 1/2/4, misaligned or out-of-range accesses.
pub fn lane(offset: usize, len: usize) -> Option<(usize, u32, u32)> {
    let mask = match len {
        1 => 0xff,
        2 => 0xffff,
        4 => 0xffff_ffff,
        _ => return None,
    };
    if !offset.is_multiple_of(len) || offset + len > CONFIG_SPACE_BYTES {
        return None;
    }
    let shift = ((offset % 4) * 8) as u32;
    Some((offset / 4, shift, mask << shift))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> PciIds {
        PciIds {
            vendor: 0x1b36,
            device: 0x0008,
            revision: 2,
            class: 0x06,
            subclass: 0x00,
            prog_if: 0x01,
            subsystem_vendor: 0x1af4,
            subsystem: 0x1100,
        }
    }

    fn read(c: &ConfigSpace, offset: usize, len: usize) -> u32 {
        let mut b = [0u8; 4];
        c.read(offset, &mut b[..len]);
        u32::from_le_bytes(b)
    }

    #[test]
    fn config_header_fields_are_where_the_spec_puts_them() {
        let c = ConfigSpace::new(ids());
        assert_eq!(read(&c, 0, 2), 0x1b36);
        assert_eq!(read(&c, 2, 2), 0x0008);
        assert_eq!(read(&c, 8, 1), 2);
        assert_eq!(read(&c, 9, 1), 0x01);
        assert_eq!(read(&c, 0xa, 1), 0x00);
        assert_eq!(read(&c, 0xb, 1), 0x06);
        assert_eq!(read(&c, 0x2c, 4), 0x1100_1af4);
        assert_eq!(read(&c, 0x34, 1), 0);
    }

    #[test]
    fn config_read_only_fields_ignore_guest_writes() {
        let mut c = ConfigSpace::new(ids());
        c.write(0, &[0xff, 0xff, 0xff, 0xff]);
        c.write(8, &0xdead_beefu32.to_le_bytes());
        c.write(0x2c, &0u32.to_le_bytes());
        assert_eq!(read(&c, 0, 4), 0x0008_1b36);
        assert_eq!(read(&c, 8, 4), 0x0600_0102);
        assert_eq!(read(&c, 0x2c, 4), 0x1100_1af4);
    }

    #[test]
    fn config_command_register_takes_only_defined_bits() {
        let mut c = ConfigSpace::new(ids());
        c.write(4, &[0xff, 0xff]);
        assert_eq!(
            c.command(),
            COMMAND_IO
                | COMMAND_MEMORY
                | COMMAND_BUS_MASTER
                | COMMAND_PARITY
                | COMMAND_SERR
                | COMMAND_INTX_DISABLE
        );
        c.write(4, &[0x02, 0x00]);
        assert_eq!(c.command(), COMMAND_MEMORY);
    }

    #[test]
    fn config_status_rw1c_bits_clear_on_one_and_keep_on_zero() {
        let mut c = ConfigSpace::new(ids());
        c.set_rw1c_bits(REG_COMMAND_STATUS, u32::from(STATUS_RW1C) << 16);
        // Writing zeros (e.g. a command-register dword write) must not clear them.
        c.write(4, &0x0000_0002u32.to_le_bytes());
        assert_eq!(read(&c, 6, 2) as u16 & STATUS_RW1C, STATUS_RW1C);
        // Clear one bit with a word write to the status register.
        c.write(6, &(1u16 << 13).to_le_bytes());
        assert_eq!(read(&c, 6, 2) as u16, STATUS_RW1C & !(1 << 13));
        // The command bits survive the status write.
        assert_eq!(c.command(), COMMAND_MEMORY);
        // RW1C bits cannot be set by the guest.
        c.write(6, &0u16.to_le_bytes());
        c.set_rw1c_bits(REG_COMMAND_STATUS, 0);
        c.write(6, &0xffffu16.to_le_bytes());
        assert_eq!(read(&c, 6, 2), 0);
    }

    #[test]
    fn config_byte_writes_merge_into_their_dword() {
        let mut c = ConfigSpace::new(ids());
        c.set_write_mask(5, 0xffff_ffff);
        c.write(0x14, &0x1122_3344u32.to_le_bytes());
        c.write(0x16, &[0xaa]);
        assert_eq!(read(&c, 0x14, 4), 0x11aa_3344);
        c.write(0x16, &0xbbccu16.to_le_bytes());
        assert_eq!(read(&c, 0x14, 4), 0xbbcc_3344);
        assert_eq!(read(&c, 0x15, 1), 0x33);
        assert_eq!(read(&c, 0x16, 2), 0xbbcc);
    }

    #[test]
    fn config_bad_widths_and_alignment_are_refused() {
        let mut c = ConfigSpace::new(ids());
        c.set_write_mask(5, 0xffff_ffff);
        c.write(0x15, &[1, 2]); // misaligned word
        c.write(0x16, &[1, 2, 3, 4]); // misaligned dword
        c.write(0x14, &[1, 2, 3]); // 3 bytes
        c.write(0xfe, &[1, 2, 3, 4]); // past the end
        assert_eq!(read(&c, 0x14, 4), 0);
        let mut b = [0u8; 3];
        c.read(0x14, &mut b);
        assert_eq!(b, [0xff; 3]);
        let mut b = [0u8; 2];
        c.read(0xff, &mut b);
        assert_eq!(b, [0xff; 2]);
    }

    #[test]
    fn config_interrupt_line_writable_pin_not() {
        let mut c = ConfigSpace::new(ids());
        c.set_interrupt_pin(1);
        c.write(0x3c, &0xffffu16.to_le_bytes());
        assert_eq!(read(&c, 0x3c, 1), 0xff);
        assert_eq!(read(&c, 0x3d, 1), 1);
    }

    #[test]
    fn config_capabilities_link_and_walk() {
        let mut c = ConfigSpace::new(ids());
        assert!(c.capabilities().is_empty());
        assert_eq!(read(&c, 6, 2) as u16 & STATUS_CAP_LIST, 0);
        let a = c.add_capability(0x05, &[0; 10], &[0xff; 10]).unwrap();
        let b = c
            .add_capability(0x11, &[0, 0, 1, 2, 3, 4], &[0; 6])
            .unwrap();
        assert_eq!(a, 0x40);
        assert_eq!(b, 0x4c); // 10 bytes rounded up to 12
        assert_eq!(read(&c, 0x34, 1), 0x40);
        assert_eq!(read(&c, 6, 2) as u16 & STATUS_CAP_LIST, STATUS_CAP_LIST);
        assert_eq!(read(&c, 0x41, 1), 0x4c);
        assert_eq!(read(&c, 0x4d, 1), 0);
        assert_eq!(c.capabilities(), vec![(0x05, 0x40), (0x11, 0x4c)]);
        assert_eq!(read(&c, 0x50, 2), 0x0403);
        // Guest cannot rewrite a capability header.
        c.write(0x40, &[0xff, 0xff]);
        assert_eq!(c.capabilities(), vec![(0x05, 0x40), (0x11, 0x4c)]);
        // But can write the body bytes the mask allows, and not the others.
        c.write(0x44, &0xdead_beefu32.to_le_bytes());
        assert_eq!(read(&c, 0x44, 4), 0xdead_beef);
        c.write(0x4e, &0u16.to_le_bytes());
        assert_eq!(read(&c, 0x4e, 2), 0x0201);
    }

    #[test]
    fn config_capability_overflow_is_an_error() {
        let mut c = ConfigSpace::new(ids());
        c.add_capability(0x09, &[0; 180], &[]).unwrap();
        assert_eq!(
            c.add_capability(0x09, &[0; 40], &[]),
            Err(ConfigSpaceError::CapabilityFull {
                id: 0x09,
                len_bytes: 40,
                next_free: 0x40 + 180,
            })
        );
        assert_eq!(
            c.add_capability(0x09, &[0], &[]),
            Err(ConfigSpaceError::CapabilityTooShort {
                id: 0x09,
                len_bytes: 1
            })
        );
        // The failed add left the list intact.
        assert_eq!(c.capabilities(), vec![(0x09, 0x40)]);
    }

    #[test]
    fn config_capability_walk_stops_on_a_loop() {
        let mut c = ConfigSpace::new(ids());
        let a = c.add_capability(0x09, &[0; 4], &[]).unwrap();
        // Point the capability at itself, as a broken device might.
        c.set_reg(a / 4, c.read_reg(a / 4) | ((a as u32) << 8));
        assert_eq!(c.capabilities().len(), 48);
    }

    #[test]
    fn config_state_round_trips_and_rejects_bad_sizes() {
        let mut c = ConfigSpace::new(ids());
        c.add_capability(0x05, &[0; 8], &[0xff; 8]).unwrap();
        c.write(4, &[0x06, 0]);
        let state = c.save();
        let json = serde_json::to_string(&state).unwrap();
        let back: ConfigSpaceState = serde_json::from_str(&json).unwrap();
        let mut r = ConfigSpace::restore(&back).unwrap();
        assert_eq!(r, c);
        // Masks came back too: the restored function still refuses read-only writes.
        r.write(0, &[0, 0, 0, 0]);
        assert_eq!(read(&r, 0, 2), 0x1b36);
        // And a later capability links after the saved list.
        r.add_capability(0x11, &[0; 4], &[]).unwrap();
        assert_eq!(r.capabilities().len(), 2);
        let mut bad = state.clone();
        bad.regs.pop();
        assert_eq!(
            ConfigSpace::restore(&bad),
            Err(ConfigSpaceError::StateSize { found: 63 })
        );
    }
}
