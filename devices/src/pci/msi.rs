//! MSI capability emulation (capability ID 0x05), and the seam through which any MSI or MSI-X vector
//! reaches the VMM's interrupt routing.
//!
//! The capability's registers live in the function's [`ConfigSpace`]; this type knows their layout
//! (always the 64-bit form, optionally with per-vector masking) and turns the guest's writes into
//! per-vector routes. A device calls [`MsiCap::config_write`] for writes that touch the capability; any
//! vector whose effective message changed (enabled, address, data, multiple-message count, mask) is
//! reported to the [`MsiRouteSink`], which programs KVM. A vector is routed only while MSI is enabled,
//! the vector is inside the enabled multiple-message count, and its mask bit is clear.
//!
//! ```text
//!  +0  id 05 | next | message control (enable, MMC 3:1 RO, MME 6:4, 64-bit RO, per-vector mask RO)
//!  +4  message address [31:2]        +8  message address [63:32]
//!  +C  message data [15:0]           +10 mask bits (if per-vector masking)   +14 pending bits (RO)
//! ```

use serde::{Deserialize, Serialize};

use super::config::{ConfigSpace, ConfigSpaceError};

/// MSI capability ID.
pub const MSI_CAP_ID: u8 = 0x05;

const CTRL_ENABLE: u16 = 1 << 0;
const CTRL_64BIT: u16 = 1 << 7;
const CTRL_PER_VECTOR_MASK: u16 = 1 << 8;
/// Most vectors MSI can carry (MMC = 5).
pub const MSI_MAX_VECTORS: u16 = 32;

/// A message a vector sends: the write an interrupt is on the bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// Errors programming an interrupt route.
#[derive(Debug, thiserror::Error)]
pub enum MsiRouteError {
    /// The VMM could not program its routing for `vector`.
    #[error("cannot program the interrupt route of vector {vector}")]
    Program {
        vector: u16,
        #[source]
        source: std::io::Error,
    },
    /// No interrupt line (GSI) is left for `vector`.
    #[error("no interrupt route left for vector {vector}")]
    NoRouteLeft { vector: u16 },
    /// The vector is not one the device registered.
    #[error("vector {vector} is outside the {vectors} vectors registered for this device")]
    UnknownVector { vector: u16, vectors: u16 },
}

/// Where a function's vector changes go. The VMM implements it (KVM GSI routing + irqfd); a route of
/// `None` removes the vector's route, so a masked or disabled vector never reaches the guest.
pub trait MsiRouteSink: Send + Sync {
    /// Sets (or removes) the route of `vector`.
    fn set_route(&self, vector: u16, route: Option<MsiMessage>) -> Result<(), MsiRouteError>;

    /// Sets the routes of several vectors at once (a restore's replay). A sink that programs a
    /// whole table per change (KVM_SET_GSI_ROUTING) writes it once here instead of once per
    /// vector, which a restore of a device with many vectors pays inside the downtime.
    fn set_routes(&self, routes: &[(u16, MsiMessage)]) -> Result<(), MsiRouteError> {
        for &(v, r) in routes {
            self.set_route(v, Some(r))?;
        }
        Ok(())
    }
}

/// Applies a guest write of `data` at `offset` to `config` and gives `sink` every vector whose
/// route, as `routes` reads it from the configuration space, changed (MSI and MSI-X alike).
pub(crate) fn write_and_report_routes(
    config: &mut ConfigSpace,
    offset: usize,
    data: &[u8],
    routes: impl Fn(&ConfigSpace) -> Vec<Option<MsiMessage>>,
    sink: &dyn MsiRouteSink,
) -> Result<(), MsiRouteError> {
    let before = routes(config);
    config.write(offset, data);
    for (v, (b, a)) in before.iter().zip(routes(config)).enumerate() {
        if *b != a {
            sink.set_route(v as u16, a)?;
        }
    }
    Ok(())
}

/// Errors building an MSI capability.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MsiCapError {
    #[error("MSI supports 1, 2, 4, 8, 16 or 32 vectors, not {vectors}")]
    BadVectorCount { vectors: u16 },
    #[error("cannot place the MSI capability")]
    Config(#[source] ConfigSpaceError),
}

/// The MSI capability of one function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsiCap {
    offset: usize,
    /// log2 of the vectors the function can send (MMC).
    mmc: u8,
    per_vector_mask: bool,
}

impl MsiCap {
    /// Adds a 64-bit MSI capability for `vectors` (a power of two up to 32) to `config`.
    pub fn add(
        config: &mut ConfigSpace,
        vectors: u16,
        per_vector_mask: bool,
    ) -> Result<Self, MsiCapError> {
        if !vectors.is_power_of_two() || vectors > MSI_MAX_VECTORS {
            return Err(MsiCapError::BadVectorCount { vectors });
        }
        let mmc = vectors.trailing_zeros() as u8;
        let len = if per_vector_mask { 0x18 } else { 0x10 };
        let mut ctrl = CTRL_64BIT | (u16::from(mmc) << 1);
        if per_vector_mask {
            ctrl |= CTRL_PER_VECTOR_MASK;
        }
        let mut body = vec![0u8; len];
        body[2..4].copy_from_slice(&ctrl.to_le_bytes());
        let mut mask = vec![0u8; len];
        // Enable and multiple-message enable.
        mask[2] = 0x71;
        mask[4..8].copy_from_slice(&0xffff_fffcu32.to_le_bytes());
        mask[8..12].copy_from_slice(&0xffff_ffffu32.to_le_bytes());
        mask[12..14].copy_from_slice(&0xffffu16.to_le_bytes());
        if per_vector_mask {
            let bits = if vectors == 32 {
                u32::MAX
            } else {
                (1u32 << vectors) - 1
            };
            mask[16..20].copy_from_slice(&bits.to_le_bytes());
        }
        let offset = config
            .add_capability(MSI_CAP_ID, &body, &mask)
            .map_err(MsiCapError::Config)?;
        Ok(Self {
            offset,
            mmc,
            per_vector_mask,
        })
    }

    /// Offset of the capability in configuration space.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Vectors the function can send.
    pub fn vectors(&self) -> u16 {
        1 << self.mmc
    }

    /// Whether a write of `len` bytes at `offset` touches the capability.
    pub fn covers(&self, offset: usize, len: usize) -> bool {
        let end = self.offset + if self.per_vector_mask { 0x18 } else { 0x10 };
        offset < end && offset + len > self.offset
    }

    fn reg(&self, config: &ConfigSpace, byte: usize) -> u32 {
        config.read_reg((self.offset + byte) / 4)
    }

    /// Whether MSI is enabled.
    pub fn enabled(&self, config: &ConfigSpace) -> bool {
        (self.reg(config, 0) >> 16) as u16 & CTRL_ENABLE != 0
    }

    /// The route of every vector the function can send, as the guest programmed it now.
    pub fn routes(&self, config: &ConfigSpace) -> Vec<Option<MsiMessage>> {
        let ctrl = (self.reg(config, 0) >> 16) as u16;
        // Multiple-message enable beyond capable is undefined; clamp to what the function has.
        let mme = ((ctrl >> 4) & 0x7).min(u16::from(self.mmc));
        let enabled_vectors = 1u16 << mme;
        let address = u64::from(self.reg(config, 4)) | (u64::from(self.reg(config, 8)) << 32);
        let data = self.reg(config, 0xc) & 0xffff;
        let mask = if self.per_vector_mask {
            self.reg(config, 0x10)
        } else {
            0
        };
        (0..self.vectors())
            .map(|v| {
                let on = ctrl & CTRL_ENABLE != 0 && v < enabled_vectors && mask & (1 << v) == 0;
                // With several messages the function puts the vector number in the low data bits.
                on.then(|| MsiMessage {
                    address,
                    data: (data & !(u32::from(enabled_vectors) - 1)) | u32::from(v),
                })
            })
            .collect()
    }

    /// Applies a guest write to `config` and reports every vector whose route changed.
    pub fn config_write(
        &self,
        config: &mut ConfigSpace,
        offset: usize,
        data: &[u8],
        sink: &dyn MsiRouteSink,
    ) -> Result<(), MsiRouteError> {
        write_and_report_routes(config, offset, data, |c| self.routes(c), sink)
    }

    /// Programs every active route again (after a restore, into a fresh VMM), all in one
    /// [`MsiRouteSink::set_routes`].
    pub fn replay(
        &self,
        config: &ConfigSpace,
        sink: &dyn MsiRouteSink,
    ) -> Result<(), MsiRouteError> {
        replay_routes(self.routes(config), sink)
    }

    /// Sets vector `v`'s pending bit (a masked vector fired) or clears it.
    pub fn set_pending(&self, config: &mut ConfigSpace, v: u16, pending: bool) {
        if !self.per_vector_mask || v >= self.vectors() {
            return;
        }
        let reg = (self.offset + 0x14) / 4;
        let bits = config.read_reg(reg);
        let bits = if pending {
            bits | (1 << v)
        } else {
            bits & !(1 << v)
        };
        config.set_reg(reg, bits);
    }
}

/// Programs the active ones of `routes` (index = vector) in one [`MsiRouteSink::set_routes`].
pub(crate) fn replay_routes(
    routes: Vec<Option<MsiMessage>>,
    sink: &dyn MsiRouteSink,
) -> Result<(), MsiRouteError> {
    let active: Vec<(u16, MsiMessage)> = routes
        .into_iter()
        .enumerate()
        .filter_map(|(v, r)| Some((u16::try_from(v).ok()?, r?)))
        .collect();
    if active.is_empty() {
        return Ok(());
    }
    sink.set_routes(&active)
}

/// A sink that records route changes: for tests of devices and the bus.
#[cfg(test)]
#[derive(Debug, Default)]
pub(crate) struct RecordingSink {
    pub routes: std::sync::Mutex<Vec<(u16, Option<MsiMessage>)>>,
}

#[cfg(test)]
impl MsiRouteSink for RecordingSink {
    fn set_route(&self, vector: u16, route: Option<MsiMessage>) -> Result<(), MsiRouteError> {
        self.routes.lock().unwrap().push((vector, route));
        Ok(())
    }
}

#[cfg(test)]
impl RecordingSink {
    pub(crate) fn take(&self) -> Vec<(u16, Option<MsiMessage>)> {
        std::mem::take(&mut *self.routes.lock().unwrap())
    }
}

#[cfg(test)]
mod tests {
    use super::super::config::PciIds;
    use super::*;

    fn config() -> ConfigSpace {
        ConfigSpace::new(PciIds {
            vendor: 0x1234,
            device: 1,
            revision: 0,
            class: 0xff,
            subclass: 0,
            prog_if: 0,
            subsystem_vendor: 0,
            subsystem: 0,
        })
    }

    fn w(cap: &MsiCap, c: &mut ConfigSpace, sink: &RecordingSink, off: usize, data: &[u8]) {
        cap.config_write(c, cap.offset() + off, data, sink).unwrap();
    }

    const ADDR: u64 = 0xfee0_1000;

    #[test]
    fn msi_capability_layout_and_read_only_fields() {
        let mut c = config();
        let cap = MsiCap::add(&mut c, 4, true).unwrap();
        assert_eq!(c.capabilities(), vec![(MSI_CAP_ID, 0x40)]);
        let ctrl = (c.read_reg(0x40 / 4) >> 16) as u16;
        assert_eq!(ctrl, CTRL_64BIT | CTRL_PER_VECTOR_MASK | (2 << 1));
        // The guest cannot change MMC, 64-bit or masking capability bits.
        c.write(0x42, &0xffffu16.to_le_bytes());
        assert_eq!((c.read_reg(0x40 / 4) >> 16) as u16, ctrl | 0x71);
        // Address low bits 1:0 are reserved; pending bits are read-only.
        c.write(0x44, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(c.read_reg(0x44 / 4), 0xffff_fffc);
        c.write(0x54, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(c.read_reg(0x54 / 4), 0);
        // Only the four existing vectors have mask bits.
        c.write(0x50, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(c.read_reg(0x50 / 4), 0xf);
        assert!(cap.covers(0x57, 1) && !cap.covers(0x58, 1) && !cap.covers(0x3c, 4));
    }

    #[test]
    fn msi_enable_routes_vector_zero_and_disable_removes_it() {
        let mut c = config();
        let cap = MsiCap::add(&mut c, 1, false).unwrap();
        let sink = RecordingSink::default();
        w(&cap, &mut c, &sink, 4, &(ADDR as u32).to_le_bytes());
        w(&cap, &mut c, &sink, 0xc, &0x4041u16.to_le_bytes());
        // Nothing is routed while MSI is disabled.
        assert!(sink.take().is_empty());
        w(&cap, &mut c, &sink, 2, &CTRL_ENABLE.to_le_bytes());
        let msg = MsiMessage {
            address: ADDR,
            data: 0x4041,
        };
        assert_eq!(sink.take(), vec![(0, Some(msg))]);
        // Changing the data while enabled re-routes.
        w(&cap, &mut c, &sink, 0xc, &0x4042u16.to_le_bytes());
        assert_eq!(
            sink.take(),
            vec![(
                0,
                Some(MsiMessage {
                    address: ADDR,
                    data: 0x4042
                })
            )]
        );
        // Writing the same value again reports nothing.
        w(&cap, &mut c, &sink, 0xc, &0x4042u16.to_le_bytes());
        assert!(sink.take().is_empty());
        w(&cap, &mut c, &sink, 2, &0u16.to_le_bytes());
        assert_eq!(sink.take(), vec![(0, None)]);
    }

    #[test]
    fn msi_upper_address_dword_reaches_the_route() {
        let mut c = config();
        let cap = MsiCap::add(&mut c, 1, false).unwrap();
        let sink = RecordingSink::default();
        w(&cap, &mut c, &sink, 8, &0x1u32.to_le_bytes());
        w(&cap, &mut c, &sink, 2, &CTRL_ENABLE.to_le_bytes());
        assert_eq!(sink.take()[0].1.unwrap().address, 1 << 32);
    }

    #[test]
    fn msi_multiple_messages_put_the_vector_in_the_data() {
        let mut c = config();
        let cap = MsiCap::add(&mut c, 8, false).unwrap();
        let sink = RecordingSink::default();
        w(&cap, &mut c, &sink, 4, &(ADDR as u32).to_le_bytes());
        w(&cap, &mut c, &sink, 0xc, &0x0023u16.to_le_bytes());
        // Enable with MME = 2 (4 vectors): data's low 2 bits carry the vector.
        w(
            &cap,
            &mut c,
            &sink,
            2,
            &(CTRL_ENABLE | (2 << 4)).to_le_bytes(),
        );
        let routes = sink.take();
        assert_eq!(routes.len(), 4);
        for (v, r) in routes {
            assert_eq!(r.unwrap().data, 0x20 | u32::from(v));
        }
        // MME beyond the capable count is clamped to it.
        w(
            &cap,
            &mut c,
            &sink,
            2,
            &(CTRL_ENABLE | (7 << 4)).to_le_bytes(),
        );
        let routes = sink.take();
        // Vectors 0..4 keep their messages; 4..8 appear.
        assert_eq!(
            routes.iter().map(|(v, _)| *v).collect::<Vec<_>>(),
            vec![4, 5, 6, 7]
        );
        assert!(routes
            .iter()
            .all(|(v, r)| r.unwrap().data == 0x20 | u32::from(*v)));
    }

    #[test]
    fn msi_per_vector_mask_removes_and_restores_routes() {
        let mut c = config();
        let cap = MsiCap::add(&mut c, 2, true).unwrap();
        let sink = RecordingSink::default();
        w(&cap, &mut c, &sink, 4, &(ADDR as u32).to_le_bytes());
        w(
            &cap,
            &mut c,
            &sink,
            2,
            &(CTRL_ENABLE | (1 << 4)).to_le_bytes(),
        );
        assert_eq!(sink.take().len(), 2);
        w(&cap, &mut c, &sink, 0x10, &2u32.to_le_bytes());
        assert_eq!(sink.take(), vec![(1, None)]);
        w(&cap, &mut c, &sink, 0x10, &0u32.to_le_bytes());
        assert_eq!(
            sink.take(),
            vec![(
                1,
                Some(MsiMessage {
                    address: ADDR,
                    data: 1
                })
            )]
        );
        // Pending bits are device-set, guest-read-only.
        cap.set_pending(&mut c, 1, true);
        assert_eq!(c.read_reg((cap.offset() + 0x14) / 4), 2);
        cap.set_pending(&mut c, 1, false);
        assert_eq!(c.read_reg((cap.offset() + 0x14) / 4), 0);
    }

    #[test]
    fn msi_replay_reprograms_only_active_vectors() {
        let mut c = config();
        let cap = MsiCap::add(&mut c, 2, true).unwrap();
        let sink = RecordingSink::default();
        w(&cap, &mut c, &sink, 0x10, &1u32.to_le_bytes());
        w(
            &cap,
            &mut c,
            &sink,
            2,
            &(CTRL_ENABLE | (1 << 4)).to_le_bytes(),
        );
        sink.take();
        let restored = ConfigSpace::restore(&c.save()).unwrap();
        cap.replay(&restored, &sink).unwrap();
        assert_eq!(
            sink.take(),
            vec![(
                1,
                Some(MsiMessage {
                    address: 0,
                    data: 1
                })
            )]
        );
    }

    #[test]
    fn msi_bad_vector_counts_are_refused() {
        for n in [0, 3, 64] {
            assert_eq!(
                MsiCap::add(&mut config(), n, false),
                Err(MsiCapError::BadVectorCount { vectors: n })
            );
        }
        assert_eq!(MsiCap::add(&mut config(), 32, true).unwrap().vectors(), 32);
    }
}
