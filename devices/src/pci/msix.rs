//! MSI-X emulation: the capability (ID 0x11) in configuration space, and the vector table and pending
//! bit array (PBA) that live in a BAR as MMIO-backed state.
//!
//! ```text
//!  capability  +0 id 11 | next | control (table size-1 RO 10:0, function mask 14, enable 15)
//!              +4 table offset | BIR (RO)     +8 PBA offset | BIR (RO)
//!  table entry +0 address lo  +4 address hi  +8 data  +C vector control (bit 0 = masked)
//! ```
//! The table and PBA accept aligned 4- and 8-byte accesses only (the spec's rule for software); other
//! reads return all-ones and other writes are dropped. A vector is routed while MSI-X is enabled, the
//! function is not masked and its entry is not masked; every change of that is reported to the
//! [`MsiRouteSink`]. Entries come out of reset masked, as the spec requires.

use serde::{Deserialize, Serialize};

use super::config::{ConfigSpace, ConfigSpaceError};
use super::msi::{write_and_report_routes, MsiMessage, MsiRouteError, MsiRouteSink};

/// MSI-X capability ID.
pub const MSIX_CAP_ID: u8 = 0x11;
/// Most vectors MSI-X can carry.
pub const MSIX_MAX_VECTORS: u16 = 2048;
/// Bytes per table entry.
pub const MSIX_ENTRY_BYTES: u64 = 16;

const CTRL_FUNCTION_MASK: u16 = 1 << 14;
const CTRL_ENABLE: u16 = 1 << 15;
const ENTRY_MASKED: u32 = 1;

/// Errors building an MSI-X capability.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MsixError {
    #[error("MSI-X supports 1..={MSIX_MAX_VECTORS} vectors, not {vectors}")]
    BadVectorCount { vectors: u16 },
    #[error("MSI-X {what} offset {offset:#x} in BAR {bar} is not 8-byte aligned or BAR > 5")]
    BadPlacement {
        what: &'static str,
        bar: u8,
        offset: u32,
    },
    #[error("cannot place the MSI-X capability")]
    Config(#[source] ConfigSpaceError),
    #[error("saved MSI-X state has {found} entries, the device has {expected}")]
    StateSize { found: usize, expected: usize },
}

/// One table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixEntry {
    pub address_lo: u32,
    pub address_hi: u32,
    pub data: u32,
    pub control: u32,
}

impl Default for MsixEntry {
    fn default() -> Self {
        Self {
            address_lo: 0,
            address_hi: 0,
            data: 0,
            control: ENTRY_MASKED,
        }
    }
}

/// Saved table and PBA (enable and function mask live in the configuration space).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixState {
    pub entries: Vec<MsixEntry>,
    pub pba: Vec<u64>,
}

/// MSI-X of one function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msix {
    cap_offset: usize,
    table_bar: u8,
    table_offset: u32,
    pba_bar: u8,
    pba_offset: u32,
    entries: Vec<MsixEntry>,
    pba: Vec<u64>,
}

/// Splits an access into the dword-sized pieces the table is made of, refusing bad widths.
fn dwords(offset: u64, len: usize, limit: u64) -> Option<impl Iterator<Item = (u64, usize)>> {
    let ok = matches!(len, 4 | 8)
        && offset.is_multiple_of(len as u64)
        && offset.checked_add(len as u64).is_some_and(|e| e <= limit);
    ok.then(|| (0..len / 4).map(move |i| (offset + 4 * i as u64, 4 * i)))
}

impl Msix {
    /// Adds an MSI-X capability with `vectors` entries whose table sits at `table_offset` of BAR
    /// `table_bar` and PBA at `pba_offset` of BAR `pba_bar`.
    pub fn add(
        config: &mut ConfigSpace,
        vectors: u16,
        (table_bar, table_offset): (u8, u32),
        (pba_bar, pba_offset): (u8, u32),
    ) -> Result<Self, MsixError> {
        if vectors == 0 || vectors > MSIX_MAX_VECTORS {
            return Err(MsixError::BadVectorCount { vectors });
        }
        for (what, bar, offset) in [
            ("table", table_bar, table_offset),
            ("PBA", pba_bar, pba_offset),
        ] {
            if bar > 5 || offset % 8 != 0 {
                return Err(MsixError::BadPlacement { what, bar, offset });
            }
        }
        let mut body = [0u8; 12];
        body[2..4].copy_from_slice(&(vectors - 1).to_le_bytes());
        body[4..8].copy_from_slice(&(table_offset | u32::from(table_bar)).to_le_bytes());
        body[8..12].copy_from_slice(&(pba_offset | u32::from(pba_bar)).to_le_bytes());
        let mut mask = [0u8; 12];
        mask[3] = 0xc0;
        let cap_offset = config
            .add_capability(MSIX_CAP_ID, &body, &mask)
            .map_err(MsixError::Config)?;
        Ok(Self {
            cap_offset,
            table_bar,
            table_offset,
            pba_bar,
            pba_offset,
            entries: vec![MsixEntry::default(); usize::from(vectors)],
            pba: vec![0; usize::from(vectors).div_ceil(64)],
        })
    }

    /// Offset of the capability in configuration space.
    pub fn cap_offset(&self) -> usize {
        self.cap_offset
    }

    /// Number of vectors.
    pub fn vectors(&self) -> u16 {
        self.entries.len() as u16
    }

    /// BAR and offset of the table.
    pub fn table_location(&self) -> (u8, u64) {
        (self.table_bar, u64::from(self.table_offset))
    }

    /// BAR and offset of the PBA.
    pub fn pba_location(&self) -> (u8, u64) {
        (self.pba_bar, u64::from(self.pba_offset))
    }

    /// Bytes of the table.
    pub fn table_len_bytes(&self) -> u64 {
        self.entries.len() as u64 * MSIX_ENTRY_BYTES
    }

    /// Bytes of the PBA (whole qwords).
    pub fn pba_len_bytes(&self) -> u64 {
        self.pba.len() as u64 * 8
    }

    /// Whether a configuration write of `len` bytes at `offset` touches the capability.
    pub fn covers(&self, offset: usize, len: usize) -> bool {
        offset < self.cap_offset + 12 && offset + len > self.cap_offset
    }

    fn control(&self, config: &ConfigSpace) -> u16 {
        (config.read_reg(self.cap_offset / 4) >> 16) as u16
    }

    /// Whether MSI-X is enabled.
    pub fn enabled(&self, config: &ConfigSpace) -> bool {
        self.control(config) & CTRL_ENABLE != 0
    }

    fn route(&self, ctrl: u16, v: usize) -> Option<MsiMessage> {
        let e = self.entries.get(v)?;
        let on = ctrl & CTRL_ENABLE != 0
            && ctrl & CTRL_FUNCTION_MASK == 0
            && e.control & ENTRY_MASKED == 0;
        on.then(|| MsiMessage {
            address: u64::from(e.address_lo) | (u64::from(e.address_hi) << 32),
            data: e.data,
        })
    }

    /// Every vector's route as programmed now.
    pub fn routes(&self, config: &ConfigSpace) -> Vec<Option<MsiMessage>> {
        let ctrl = self.control(config);
        (0..self.entries.len())
            .map(|v| self.route(ctrl, v))
            .collect()
    }

    /// Applies a guest configuration write and reports vectors whose route changed.
    pub fn config_write(
        &self,
        config: &mut ConfigSpace,
        offset: usize,
        data: &[u8],
        sink: &dyn MsiRouteSink,
    ) -> Result<(), MsiRouteError> {
        write_and_report_routes(config, offset, data, |c| self.routes(c), sink)
    }

    /// Guest read of the table at `offset` (from the table's start).
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        let Some(parts) = dwords(offset, data.len(), self.table_len_bytes()) else {
            data.fill(0xff);
            return;
        };
        for (off, at) in parts {
            let e = &self.entries[(off / MSIX_ENTRY_BYTES) as usize];
            let v = match off % MSIX_ENTRY_BYTES {
                0 => e.address_lo,
                4 => e.address_hi,
                8 => e.data,
                _ => e.control,
            };
            data[at..at + 4].copy_from_slice(&v.to_le_bytes());
        }
    }

    /// Guest write to the table; reports the entry's route if it changed.
    pub fn table_write(
        &mut self,
        config: &ConfigSpace,
        offset: u64,
        data: &[u8],
        sink: &dyn MsiRouteSink,
    ) -> Result<(), MsiRouteError> {
        let Some(parts) = dwords(offset, data.len(), self.table_len_bytes()) else {
            return Ok(());
        };
        let ctrl = self.control(config);
        let v = (offset / MSIX_ENTRY_BYTES) as usize;
        let before = self.route(ctrl, v);
        for (off, at) in parts {
            let mut b = [0u8; 4];
            b.copy_from_slice(&data[at..at + 4]);
            let val = u32::from_le_bytes(b);
            let e = &mut self.entries[(off / MSIX_ENTRY_BYTES) as usize];
            match off % MSIX_ENTRY_BYTES {
                // Message addresses are dword aligned: bits 1:0 are reserved.
                0 => e.address_lo = val & !0x3,
                4 => e.address_hi = val,
                8 => e.data = val,
                // Only the mask bit of vector control is defined.
                _ => e.control = val & ENTRY_MASKED,
            }
        }
        let after = self.route(ctrl, v);
        if before != after {
            sink.set_route(v as u16, after)?;
        }
        Ok(())
    }

    /// Guest read of the PBA at `offset` (from the PBA's start). Guest writes to the PBA are
    /// dropped: it is read-only.
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        let Some(parts) = dwords(offset, data.len(), self.pba_len_bytes()) else {
            data.fill(0xff);
            return;
        };
        for (off, at) in parts {
            let q = self.pba[(off / 8) as usize];
            let v = (q >> ((off % 8) * 8)) as u32;
            data[at..at + 4].copy_from_slice(&v.to_le_bytes());
        }
    }

    /// Sets or clears vector `v`'s pending bit (a device fired a masked vector / delivered it).
    pub fn set_pending(&mut self, v: u16, pending: bool) {
        let v = usize::from(v);
        if v >= self.entries.len() {
            return;
        }
        let (q, bit) = (v / 64, 1u64 << (v % 64));
        if pending {
            self.pba[q] |= bit;
        } else {
            self.pba[q] &= !bit;
        }
    }

    /// Whether vector `v` is pending.
    pub fn pending(&self, v: u16) -> bool {
        let v = usize::from(v);
        v < self.entries.len() && self.pba[v / 64] & (1 << (v % 64)) != 0
    }

    /// Programs every active route again (after a restore), in one [`MsiRouteSink::set_routes`].
    pub fn replay(
        &self,
        config: &ConfigSpace,
        sink: &dyn MsiRouteSink,
    ) -> Result<(), MsiRouteError> {
        super::msi::replay_routes(self.routes(config), sink)
    }

    /// Saved table and PBA.
    pub fn save(&self) -> MsixState {
        MsixState {
            entries: self.entries.clone(),
            pba: self.pba.clone(),
        }
    }

    /// Loads saved table and PBA into a capability built the same way as the saved one.
    pub fn load(&mut self, state: &MsixState) -> Result<(), MsixError> {
        if state.entries.len() != self.entries.len() || state.pba.len() != self.pba.len() {
            return Err(MsixError::StateSize {
                found: state.entries.len(),
                expected: self.entries.len(),
            });
        }
        self.entries.clone_from(&state.entries);
        self.pba.clone_from(&state.pba);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::config::PciIds;
    use super::super::msi::RecordingSink;
    use super::*;

    fn config() -> ConfigSpace {
        ConfigSpace::new(PciIds {
            vendor: 0x1234,
            device: 2,
            revision: 0,
            class: 0xff,
            subclass: 0,
            prog_if: 0,
            subsystem_vendor: 0,
            subsystem: 0,
        })
    }

    fn setup(vectors: u16) -> (ConfigSpace, Msix, RecordingSink) {
        let mut c = config();
        let m = Msix::add(&mut c, vectors, (2, 0), (2, 0x800)).unwrap();
        (c, m, RecordingSink::default())
    }

    fn enable(c: &mut ConfigSpace, m: &Msix, sink: &RecordingSink, ctrl: u16) {
        m.config_write(c, m.cap_offset() + 2, &ctrl.to_le_bytes(), sink)
            .unwrap();
    }

    fn program(m: &mut Msix, c: &ConfigSpace, sink: &RecordingSink, v: u64, addr: u64, data: u32) {
        let base = v * MSIX_ENTRY_BYTES;
        m.table_write(c, base, &addr.to_le_bytes(), sink).unwrap();
        m.table_write(c, base + 8, &data.to_le_bytes(), sink)
            .unwrap();
    }

    #[test]
    fn msix_capability_fields() {
        let (c, m, _) = setup(5);
        let off = m.cap_offset();
        assert_eq!(c.capabilities(), vec![(MSIX_CAP_ID, off)]);
        assert_eq!(c.read_reg(off / 4) >> 16, 4);
        assert_eq!(c.read_reg(off / 4 + 1), 2);
        assert_eq!(c.read_reg(off / 4 + 2), 0x802);
        assert_eq!(m.table_len_bytes(), 80);
        assert_eq!(m.pba_len_bytes(), 8);
        assert_eq!(m.table_location(), (2, 0));
        assert_eq!(m.pba_location(), (2, 0x800));
    }

    #[test]
    fn msix_read_only_control_bits_and_offsets() {
        let (mut c, m, sink) = setup(5);
        let off = m.cap_offset();
        enable(&mut c, &m, &sink, 0xffff);
        assert_eq!(c.read_reg(off / 4) >> 16, 0xc004);
        c.write(off + 4, &[0xff; 4]);
        c.write(off + 8, &[0xff; 4]);
        assert_eq!(c.read_reg(off / 4 + 1), 2);
        assert_eq!(c.read_reg(off / 4 + 2), 0x802);
    }

    #[test]
    fn msix_entries_reset_masked_and_route_once_unmasked() {
        let (mut c, mut m, sink) = setup(4);
        let mut b = [0u8; 4];
        m.table_read(12, &mut b);
        assert_eq!(u32::from_le_bytes(b), 1);
        enable(&mut c, &m, &sink, CTRL_ENABLE);
        program(&mut m, &c, &sink, 1, 0xfee0_0000, 0x31);
        // Still masked: nothing routed yet.
        assert!(sink.take().is_empty());
        m.table_write(&c, 16 + 12, &0u32.to_le_bytes(), &sink)
            .unwrap();
        let msg = MsiMessage {
            address: 0xfee0_0000,
            data: 0x31,
        };
        assert_eq!(sink.take(), vec![(1, Some(msg))]);
        // Re-targeting an unmasked vector reroutes it.
        m.table_write(&c, 16 + 8, &0x32u32.to_le_bytes(), &sink)
            .unwrap();
        assert_eq!(sink.take()[0].1.unwrap().data, 0x32);
        // Mask again: route removed.
        m.table_write(&c, 16 + 12, &1u32.to_le_bytes(), &sink)
            .unwrap();
        assert_eq!(sink.take(), vec![(1, None)]);
    }

    #[test]
    fn msix_function_mask_and_enable_gate_every_vector() {
        let (mut c, mut m, sink) = setup(3);
        for v in 0..3 {
            program(&mut m, &c, &sink, v, 0xfee0_0000, v as u32);
            m.table_write(&c, v * 16 + 12, &0u32.to_le_bytes(), &sink)
                .unwrap();
        }
        assert!(sink.take().is_empty(), "MSI-X disabled: no routes");
        enable(&mut c, &m, &sink, CTRL_ENABLE | CTRL_FUNCTION_MASK);
        assert!(sink.take().is_empty(), "function masked: no routes");
        enable(&mut c, &m, &sink, CTRL_ENABLE);
        let got = sink.take();
        assert_eq!(got.len(), 3);
        assert!(got.iter().all(|(v, r)| r.unwrap().data == u32::from(*v)));
        enable(&mut c, &m, &sink, CTRL_ENABLE | CTRL_FUNCTION_MASK);
        assert_eq!(sink.take(), vec![(0, None), (1, None), (2, None)]);
    }

    #[test]
    fn msix_table_access_widths() {
        let (c, mut m, sink) = setup(2);
        // 8-byte write of address, then 8-byte write of data + control.
        m.table_write(&c, 16, &0x1_fee0_0004u64.to_le_bytes(), &sink)
            .unwrap();
        m.table_write(&c, 24, &((1u64 << 32) | 0x55).to_le_bytes(), &sink)
            .unwrap();
        let mut q = [0u8; 8];
        m.table_read(16, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0x1_fee0_0004);
        m.table_read(24, &mut q);
        assert_eq!(u64::from_le_bytes(q), (1 << 32) | 0x55);
        // Reserved address bits 1:0 and control bits beyond the mask bit do not stick.
        m.table_write(&c, 16, &0xfee0_0007u32.to_le_bytes(), &sink)
            .unwrap();
        m.table_write(&c, 28, &0xffff_fffeu32.to_le_bytes(), &sink)
            .unwrap();
        let mut d = [0u8; 4];
        m.table_read(16, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0xfee0_0004);
        m.table_read(28, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0);
        // Bad widths and alignments: reads all-ones, writes dropped.
        let mut w = [0u8; 2];
        m.table_read(16, &mut w);
        assert_eq!(w, [0xff; 2]);
        let mut b = [0u8; 1];
        m.table_read(16, &mut b);
        assert_eq!(b, [0xff]);
        m.table_read(20, &mut q); // misaligned qword
        assert_eq!(q, [0xff; 8]);
        m.table_read(32, &mut d); // past the table
        assert_eq!(d, [0xff; 4]);
        m.table_write(&c, 24, &[9, 9], &sink).unwrap();
        m.table_write(&c, 20, &[9; 8], &sink).unwrap();
        m.table_read(24, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x55);
        m.table_read(20, &mut d);
        assert_eq!(u32::from_le_bytes(d), 1);
        assert!(sink.take().is_empty());
    }

    #[test]
    fn msix_pba_reports_pending_bits_at_dword_and_qword_width() {
        let (_, mut m, _) = setup(70);
        assert_eq!(m.pba_len_bytes(), 16);
        m.set_pending(0, true);
        m.set_pending(33, true);
        m.set_pending(65, true);
        m.set_pending(500, true); // out of range: ignored
        let mut q = [0u8; 8];
        m.pba_read(0, &mut q);
        assert_eq!(u64::from_le_bytes(q), (1 << 33) | 1);
        let mut d = [0u8; 4];
        m.pba_read(4, &mut d);
        assert_eq!(u32::from_le_bytes(d), 2);
        m.pba_read(8, &mut d);
        assert_eq!(u32::from_le_bytes(d), 2);
        assert!(m.pending(65) && !m.pending(64));
        m.set_pending(65, false);
        m.pba_read(8, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0);
        m.pba_read(2, &mut d);
        assert_eq!(d, [0xff; 4]);
        m.pba_read(16, &mut d);
        assert_eq!(d, [0xff; 4]);
    }

    #[test]
    fn msix_state_round_trips_and_replays() {
        let (mut c, mut m, sink) = setup(2);
        enable(&mut c, &m, &sink, CTRL_ENABLE);
        program(&mut m, &c, &sink, 1, 0xfee0_1000, 7);
        m.table_write(&c, 28, &0u32.to_le_bytes(), &sink).unwrap();
        m.set_pending(0, true);
        sink.take();
        let state: MsixState =
            serde_json::from_str(&serde_json::to_string(&m.save()).unwrap()).unwrap();
        let mut c2 = config();
        let mut m2 = Msix::add(&mut c2, 2, (2, 0), (2, 0x800)).unwrap();
        m2.load(&state).unwrap();
        let c2 = ConfigSpace::restore(&c.save()).unwrap();
        assert_eq!(m2, m);
        m2.replay(&c2, &sink).unwrap();
        assert_eq!(
            sink.take(),
            vec![(
                1,
                Some(MsiMessage {
                    address: 0xfee0_1000,
                    data: 7
                })
            )]
        );
        let mut other = Msix::add(&mut config(), 3, (2, 0), (2, 0x800)).unwrap();
        assert_eq!(
            other.load(&state),
            Err(MsixError::StateSize {
                found: 2,
                expected: 3
            })
        );
    }

    #[test]
    fn msix_bad_geometry_is_refused() {
        assert_eq!(
            Msix::add(&mut config(), 0, (0, 0), (0, 0x800)),
            Err(MsixError::BadVectorCount { vectors: 0 })
        );
        assert_eq!(
            Msix::add(&mut config(), 2049, (0, 0), (0, 0x800)),
            Err(MsixError::BadVectorCount { vectors: 2049 })
        );
        assert!(matches!(
            Msix::add(&mut config(), 4, (6, 0), (0, 0x800)),
            Err(MsixError::BadPlacement { what: "table", .. })
        ));
        assert!(matches!(
            Msix::add(&mut config(), 4, (0, 0), (0, 0x804)),
            Err(MsixError::BadPlacement { what: "PBA", .. })
        ));
    }
}
