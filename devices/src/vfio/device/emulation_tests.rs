//! The passthrough emulation driven against a fake host function: what the guest sees in
//! configuration space, which accesses reach the function, and when VFIO is asked to signal the
//! vector eventfds.

use std::sync::{Arc, Mutex};

use vfio_bindings::bindings::vfio::{
    VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX, VFIO_PCI_MSI_IRQ_INDEX,
};
use vfio_ioctls::VfioError;
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::pci::bus::{PciBus, PciSpace, PciWindowRange};
use crate::pci::msi::{MsiMessage, RecordingSink};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    Write {
        index: u32,
        offset: u64,
        data: Vec<u8>,
    },
    Enable {
        index: u32,
        vectors: usize,
    },
    Disable {
        index: u32,
    },
}

/// A host function: a 256-byte configuration space, BAR sizes, interrupt counts; BAR reads return
/// `0xa0 + index` in every byte; every write and SET_IRQS is logged.
struct FakeFunction {
    config: [u8; 256],
    sizes: [u64; 6],
    msi: u32,
    msix: u32,
    // Every region is mmap-able in full (anonymous memory stands in for the BAR).
    mmap: bool,
    log: Arc<Mutex<Vec<Call>>>,
}

impl VfioFunction for FakeFunction {
    fn region_read(&self, index: u32, buf: &mut [u8], offset: u64) {
        if index == VFIO_PCI_CONFIG_REGION_INDEX {
            let o = offset as usize;
            buf.copy_from_slice(&self.config[o..o + buf.len()]);
        } else {
            buf.fill(0xa0 + index as u8);
        }
    }
    fn region_write(&self, index: u32, buf: &[u8], offset: u64) {
        self.log.lock().unwrap().push(Call::Write {
            index,
            offset,
            data: buf.to_vec(),
        });
    }
    fn region_size(&self, index: u32) -> u64 {
        self.sizes.get(index as usize).copied().unwrap_or(0)
    }
    fn irq_count(&self, index: u32) -> u32 {
        match index {
            VFIO_PCI_MSI_IRQ_INDEX => self.msi,
            VFIO_PCI_MSIX_IRQ_INDEX => self.msix,
            _ => 0,
        }
    }
    fn enable_irq(&self, index: u32, fds: &[&EventFd]) -> Result<(), VfioError> {
        self.log.lock().unwrap().push(Call::Enable {
            index,
            vectors: fds.len(),
        });
        Ok(())
    }
    fn disable_irq(&self, index: u32) -> Result<(), VfioError> {
        self.log.lock().unwrap().push(Call::Disable { index });
        Ok(())
    }
    fn mmap_areas(&self, index: u32) -> Vec<(u64, u64)> {
        if self.mmap {
            vec![(0, self.region_size(index))]
        } else {
            Vec::new()
        }
    }
    fn mmap(&self, _: u32, _: u64, len: u64) -> std::io::Result<RegionMapping> {
        RegionMapping::anonymous(len)
    }
}

/// Slots as (slot, guest address, length), numbered from 10.
#[derive(Default)]
struct FakeMemory {
    live: Mutex<Vec<(u32, u64, u64)>>,
    next: Mutex<u32>,
}

impl BarMemory for FakeMemory {
    fn map(&self, gpa: u64, m: &Arc<RegionMapping>) -> Result<u32, ResourceError> {
        let mut n = self.next.lock().unwrap();
        let slot = 10 + *n;
        *n += 1;
        self.live.lock().unwrap().push((slot, gpa, m.len()));
        Ok(slot)
    }
    fn unmap(&self, slot: u32) {
        self.live.lock().unwrap().retain(|s| s.0 != slot);
    }
}

/// BARs from a bump allocator at 0xc000_0000 (memory) and 0xc000 (I/O); vectors to a recorder.
struct FakeResources {
    next_mem: u64,
    next_io: u64,
    sink: Arc<RecordingSink>,
    memory: Option<Arc<FakeMemory>>,
}

impl PciResources for FakeResources {
    fn allocate_bar(&mut self, spec: &BarSpec) -> Result<u64, ResourceError> {
        let next = if spec.kind.is_io() {
            &mut self.next_io
        } else {
            &mut self.next_mem
        };
        let addr = next.next_multiple_of(spec.size);
        *next = addr + spec.size;
        Ok(addr)
    }
    fn msi_vectors(
        &mut self,
        count: u16,
    ) -> Result<(Arc<dyn MsiRouteSink>, Vec<EventFd>), ResourceError> {
        let fds = (0..count)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<Result<_, _>>()?;
        Ok((self.sink.clone(), fds))
    }
    fn bar_memory(&mut self) -> Option<Arc<dyn BarMemory>> {
        self.memory.clone().map(|m| m as Arc<dyn BarMemory>)
    }
}

fn put32(config: &mut [u8; 256], offset: usize, v: u32) {
    config[offset..offset + 4].copy_from_slice(&v.to_le_bytes());
}

fn build(
    config: [u8; 256],
    sizes: [u64; 6],
    msi: u32,
    msix: u32,
) -> (VfioPciDevice, Arc<Mutex<Vec<Call>>>, Arc<RecordingSink>) {
    build_with(config, sizes, msi, msix, None)
}

/// Like [`build`]; with `memory`, every region is mmap-able and mapped through it.
fn build_with(
    config: [u8; 256],
    sizes: [u64; 6],
    msi: u32,
    msix: u32,
    memory: Option<Arc<FakeMemory>>,
) -> (VfioPciDevice, Arc<Mutex<Vec<Call>>>, Arc<RecordingSink>) {
    let mmap = memory.is_some();
    let log = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::new(RecordingSink::default());
    let mut res = FakeResources {
        next_mem: 0xc000_0000,
        next_io: 0xc000,
        sink: sink.clone(),
        memory,
    };
    let info = VfioDeviceInfo {
        id: "fake".into(),
        sysfs: "/sys/bus/pci/devices/0000:00:03.0".into(),
        backend: VfioBackend::Type1,
        hw_dirty_tracking: false,
        migration: Some(crate::vfio::migration::MigrationCaps::ALL),
        vendor_id: 0,
        device_id: 0,
        dma_logging: false,
        dma_dirty: crate::vfio::dma_dirty::method::DmaDirtySelection {
            method: None,
            migratable: false,
            reason: "fake".into(),
        },
        dma_mapped_bytes: 0,
    };
    let function = FakeFunction {
        config,
        sizes,
        msi,
        msix,
        mmap,
        log: log.clone(),
    };
    let dev = VfioPciDevice::emulate(info, Box::new(function), None, &mut res).unwrap();
    (dev, log, sink)
}

/// The guest's capability list: (id, offset) pairs.
fn caps(dev: &mut VfioPciDevice) -> Vec<(u32, usize)> {
    let mut out = Vec::new();
    let mut ptr = (dev.config_read(0x34 / 4) & 0xfc) as usize;
    while ptr != 0 {
        let v = dev.config_read(ptr / 4);
        out.push((v & 0xff, ptr));
        ptr = ((v >> 8) & 0xfc) as usize;
    }
    out
}

fn take(log: &Mutex<Vec<Call>>) -> Vec<Call> {
    std::mem::take(&mut *log.lock().unwrap())
}

/// An edu-like function: 1234:11e8, class 00ff00 rev 10, BAR 0 32-bit 1 MiB, one MSI vector.
fn edu_like() -> [u8; 256] {
    let mut c = [0u8; 256];
    put32(&mut c, 0, 0x11e8_1234);
    put32(&mut c, 8, 0x00ff_0010);
    put32(&mut c, 0x2c, 0x1100_1af4);
    c
}

#[test]
fn guest_sees_the_functions_ids_and_its_bars_at_vmm_addresses() {
    let (mut dev, log, _) = build(edu_like(), [1 << 20, 0, 0, 0, 0, 0], 1, 0);
    assert_eq!(dev.config_read(0), 0x11e8_1234);
    assert_eq!(dev.config_read(2), 0x00ff_0010);
    assert_eq!(dev.config_read(0x2c / 4), 0x1100_1af4);
    assert_eq!(dev.config_read(4), 0xc000_0000);
    // Sizing: all-ones reads back the 1 MiB mask.
    dev.config_write(0x10, &u32::MAX.to_le_bytes());
    assert_eq!(dev.config_read(4), 0xfff0_0000);
    dev.config_write(0x10, &0xc000_0000u32.to_le_bytes());
    // BAR writes stay in the emulation; the function never sees them.
    assert!(take(&log).is_empty());
    assert_eq!(caps(&mut dev), vec![(0x05, 0x40)]);
    // Not decoded until memory space is on.
    assert!(dev.decoded_bars().is_empty());
}

#[test]
fn command_writes_reach_the_function_so_bus_mastering_works() {
    let (mut dev, log, _) = build(edu_like(), [1 << 20, 0, 0, 0, 0, 0], 1, 0);
    dev.config_write(4, &[0x06, 0x00]);
    assert_eq!(
        take(&log),
        vec![Call::Write {
            index: VFIO_PCI_CONFIG_REGION_INDEX,
            offset: 4,
            data: vec![0x06, 0x00]
        }]
    );
    assert_eq!(dev.decoded_bars().len(), 1);
    assert_eq!(dev.decoded_bars()[0].addr, 0xc000_0000);
    // A write elsewhere in the header does not.
    dev.config_write(0x3c, &[0x0b]);
    assert!(take(&log).is_empty());
}

#[test]
fn msi_enable_routes_the_vector_and_hands_its_eventfd_to_vfio() {
    let (mut dev, log, sink) = build(edu_like(), [1 << 20, 0, 0, 0, 0, 0], 1, 0);
    let cap = caps(&mut dev)[0].1;
    dev.config_write(cap + 4, &0xfee0_0000u32.to_le_bytes());
    dev.config_write(cap + 8, &0u32.to_le_bytes());
    dev.config_write(cap + 12, &0x40u16.to_le_bytes());
    assert!(take(&log).is_empty(), "nothing enabled yet");
    dev.config_write(cap + 2, &1u16.to_le_bytes());
    assert_eq!(
        take(&log),
        vec![Call::Enable {
            index: VFIO_PCI_MSI_IRQ_INDEX,
            vectors: 1
        }]
    );
    assert_eq!(
        sink.take(),
        vec![(
            0,
            Some(MsiMessage {
                address: 0xfee0_0000,
                data: 0x40
            })
        )]
    );
    dev.config_write(cap + 2, &0u16.to_le_bytes());
    assert_eq!(
        take(&log),
        vec![Call::Disable {
            index: VFIO_PCI_MSI_IRQ_INDEX
        }]
    );
    assert_eq!(sink.take(), vec![(0, None)]);
}

#[test]
fn bar_accesses_pass_through_to_the_region() {
    let (mut dev, log, _) = build(edu_like(), [1 << 20, 0, 0, 0, 0, 0], 1, 0);
    let mut b = [0u8; 4];
    dev.bar_read(0, 0x8, &mut b);
    assert_eq!(b, [0xa0; 4]);
    dev.bar_write(0, 0x80, &0x20_0000u32.to_le_bytes());
    assert_eq!(
        take(&log),
        vec![Call::Write {
            index: 0,
            offset: 0x80,
            data: 0x20_0000u32.to_le_bytes().to_vec()
        }]
    );
}

#[test]
fn msix_table_and_pba_are_emulated_and_the_rest_of_their_bar_passes_through() {
    // Capability list at 0x40: MSI-X, 4 vectors, table at BAR 0 + 0x2000, PBA at BAR 0 + 0x3000;
    // BAR 0 is 64-bit, 16 KiB.
    let mut c = edu_like();
    put32(&mut c, 4, 1 << 20);
    c[0x34] = 0x40;
    put32(&mut c, 0x40, 0x0003_0011);
    put32(&mut c, 0x44, 0x2000);
    put32(&mut c, 0x48, 0x3000);
    put32(&mut c, 0x10, 0x4);
    let (mut dev, log, sink) = build(c, [0x4000, 0, 0, 0, 0, 0], 0, 4);
    let cap = caps(&mut dev)
        .into_iter()
        .find(|(id, _)| *id == 0x11)
        .expect("MSI-X capability")
        .1;
    assert_eq!(dev.config_read((cap + 4) / 4), 0x2000);
    assert_eq!(dev.config_read((cap + 8) / 4), 0x3000);
    // Vector 1's entry: address, data, unmask, all in the emulated table.
    dev.bar_write(0, 0x2010, &0xfee0_0000u64.to_le_bytes());
    dev.bar_write(0, 0x2018, &0x41u32.to_le_bytes());
    dev.config_write(cap + 2, &0x8000u16.to_le_bytes());
    assert_eq!(
        take(&log),
        vec![Call::Enable {
            index: VFIO_PCI_MSIX_IRQ_INDEX,
            vectors: 4
        }]
    );
    dev.bar_write(0, 0x201c, &0u32.to_le_bytes());
    assert_eq!(
        sink.take(),
        vec![(
            1,
            Some(MsiMessage {
                address: 0xfee0_0000,
                data: 0x41
            })
        )]
    );
    let mut q = [0u8; 8];
    dev.bar_read(0, 0x2010, &mut q);
    assert_eq!(u64::from_le_bytes(q), 0xfee0_0000);
    dev.bar_read(0, 0x3000, &mut q);
    assert_eq!(q, [0; 8], "PBA from the emulation, not the function");
    // Outside the table and PBA the BAR is the function's.
    dev.bar_read(0, 0x100, &mut q);
    assert_eq!(q, [0xa0; 8]);
    dev.bar_write(0, 0x100, &[1]);
    assert_eq!(
        take(&log),
        vec![Call::Write {
            index: 0,
            offset: 0x100,
            data: vec![1]
        }]
    );
}

#[test]
fn teardown_disables_enabled_interrupts() {
    let (mut dev, log, _) = build(edu_like(), [1 << 20, 0, 0, 0, 0, 0], 1, 0);
    let cap = caps(&mut dev)[0].1;
    dev.config_write(cap + 2, &1u16.to_le_bytes());
    take(&log);
    drop(dev);
    assert_eq!(
        take(&log),
        vec![Call::Disable {
            index: VFIO_PCI_MSI_IRQ_INDEX
        }]
    );
}

#[test]
fn mmap_able_bars_become_slots_that_follow_decode_and_skip_the_msix_pages() {
    // BAR 0: 64 KiB with the MSI-X table at 0x2000 and the PBA at 0x3000; BAR 2: 1 MiB, no MSI-X.
    let mut c = edu_like();
    put32(&mut c, 4, 1 << 20);
    c[0x34] = 0x40;
    put32(&mut c, 0x40, 0x0003_0011);
    put32(&mut c, 0x44, 0x2000);
    put32(&mut c, 0x48, 0x3000);
    let mem = Arc::new(FakeMemory::default());
    let (mut dev, _, _) = build_with(c, [0x10000, 0, 1 << 20, 0, 0, 0], 0, 4, Some(mem.clone()));
    let live = |m: &FakeMemory| {
        let mut v: Vec<_> = m.live.lock().unwrap().iter().map(|s| (s.1, s.2)).collect();
        v.sort();
        v
    };
    // Nothing decoded yet: no slots.
    assert!(live(&mem).is_empty());
    let bar0 = u64::from(dev.config_read(4) & !0xf);
    let bar2 = u64::from(dev.config_read(6) & !0xf);
    // The bus tells the device where its BARs decode now (here, where the VMM put them).
    dev.move_bar(0, None, Some(bar0)).unwrap();
    dev.move_bar(2, None, Some(bar2)).unwrap();
    let page = crate::sys::vfio_region_mmap::page_size();
    assert_eq!(
        live(&mem),
        vec![
            (bar0, 0x2000),
            (bar0 + 0x3000 + page, 0x10000 - 0x3000 - page),
            (bar2, 1 << 20)
        ]
        .into_iter()
        .filter(|s| s.1 > 0)
        .collect::<Vec<_>>()
    );
    assert_eq!(dev.direct_slots().len(), live(&mem).len());
    // The guest moves BAR 2 and turns BAR 0's decode off.
    dev.move_bar(2, Some(bar2), Some(bar2 + (1 << 20))).unwrap();
    dev.move_bar(0, Some(bar0), None).unwrap();
    assert_eq!(live(&mem), vec![(bar2 + (1 << 20), 1 << 20)]);
    // Teardown deletes the rest.
    drop(dev);
    assert!(live(&mem).is_empty());
}

#[test]
fn a_function_without_migration_support_refuses_to_save() {
    let (mut dev, _, _) = build(edu_like(), [1 << 20, 0, 0, 0, 0, 0], 1, 0);
    dev.info.migration = None;
    assert!(matches!(
        dev.save(),
        Err(PciStateError::NotMigratable { device })
            if device.contains("fake") && device.contains("no VFIO migration v2")
    ));
    assert!(dev.state_source().unwrap().is_none());
    assert!(dev.state_sink().unwrap().is_none());
}

/// The guest-visible configuration space, register by register.
fn registers(dev: &mut VfioPciDevice) -> Vec<u32> {
    (0..64).map(|r| dev.config_read(r)).collect()
}

fn saved(dev: &VfioPciDevice) -> VfioPciState {
    // Through the wire format, as a migration carries it.
    let json = serde_json::to_vec(&dev.save().expect("migratable")).unwrap();
    match serde_json::from_slice(&json).unwrap() {
        PciDeviceState::Vfio(s) => s,
        other => panic!("a VFIO function saved {other:?}"),
    }
}

#[test]
fn saved_config_loads_into_a_fresh_function_bars_where_the_guest_put_them_and_msi_on() {
    let sizes = [1 << 20, 0, 0, 0, 0, 0];
    let (mut src, _, _) = build_with(edu_like(), sizes, 1, 0, Some(Arc::default()));
    // The guest moves BAR 0, turns decode and bus mastering on, programs and enables MSI.
    src.config_write(0x10, &0xd000_0000u32.to_le_bytes());
    src.config_write(4, &0x0006u16.to_le_bytes());
    src.config_write(0x3c, &[0x0b]);
    let cap = caps(&mut src)[0].1;
    src.config_write(cap + 4, &0xfee0_1000u32.to_le_bytes());
    src.config_write(cap + 12, &0x4041u16.to_le_bytes());
    src.config_write(cap + 2, &1u16.to_le_bytes());
    let state = saved(&src);

    // The destination opened its own function, with BARs where its VMM put them.
    let mem = Arc::new(FakeMemory::default());
    let (dst, log, sink) = build_with(edu_like(), sizes, 1, 0, Some(mem.clone()));
    let dst = Arc::new(Mutex::new(dst));
    assert_eq!(dst.lock().unwrap().config_read(4), 0xc000_0000);
    let mut bus = PciBus::new(vec![PciWindowRange {
        space: PciSpace::Memory,
        base: 0xc000_0000,
        len: 0x2000_0000,
    }]);
    bus.add_device(Some(3), dst.clone()).unwrap();
    dst.lock().unwrap().restore(&state).unwrap();
    assert!(bus.refresh(3).is_empty());

    let mut d = dst.lock().unwrap();
    assert_eq!(registers(&mut d), registers(&mut src));
    assert_eq!(
        take(&log),
        vec![
            Call::Write {
                index: VFIO_PCI_CONFIG_REGION_INDEX,
                offset: 4,
                data: vec![0x06, 0x00]
            },
            Call::Enable {
                index: VFIO_PCI_MSI_IRQ_INDEX,
                vectors: 1
            }
        ],
        "decode and bus master reach the function; its MSI eventfd goes to VFIO"
    );
    assert_eq!(
        sink.take(),
        vec![(
            0,
            Some(MsiMessage {
                address: 0xfee0_1000,
                data: 0x4041
            })
        )]
    );
    assert_eq!(d.decoded_bars()[0].addr, 0xd000_0000);
    let live: Vec<_> = mem
        .live
        .lock()
        .unwrap()
        .iter()
        .map(|s| (s.1, s.2))
        .collect();
    assert_eq!(
        live,
        [(0xd000_0000, 1 << 20)],
        "the BAR's memory slot moved too"
    );
    assert_eq!(d.direct_slots().len(), 1);
    drop(d);
    let (_, index, offset) = bus.resolve(PciSpace::Memory, 0xd000_0010).expect("mapped");
    assert_eq!((index, offset), (0, 0x10));
    assert!(bus.resolve(PciSpace::Memory, 0xc000_0010).is_none());
}

#[test]
fn the_msix_table_and_enable_move_with_the_state() {
    let mut c = edu_like();
    put32(&mut c, 4, 1 << 20);
    c[0x34] = 0x40;
    put32(&mut c, 0x40, 0x0003_0011);
    put32(&mut c, 0x44, 0x2000);
    put32(&mut c, 0x48, 0x3000);
    put32(&mut c, 0x10, 0x4);
    let sizes = [0x4000, 0, 0, 0, 0, 0];
    let (mut src, _, _) = build(c, sizes, 0, 4);
    let cap = caps(&mut src)
        .into_iter()
        .find(|(id, _)| *id == 0x11)
        .expect("MSI-X capability")
        .1;
    src.bar_write(0, 0x2010, &0xfee0_0000u64.to_le_bytes());
    src.bar_write(0, 0x2018, &0x41u32.to_le_bytes());
    src.config_write(cap + 2, &0x8000u16.to_le_bytes());
    src.bar_write(0, 0x201c, &0u32.to_le_bytes());
    let state = saved(&src);

    let (mut dst, log, sink) = build(c, sizes, 0, 4);
    dst.restore(&state).unwrap();
    assert_eq!(registers(&mut dst), registers(&mut src));
    let mut q = [0u8; 16];
    dst.bar_read(0, 0x2010, &mut q[..8]);
    dst.bar_read(0, 0x2018, &mut q[8..]);
    let mut want = [0u8; 16];
    src.bar_read(0, 0x2010, &mut want[..8]);
    src.bar_read(0, 0x2018, &mut want[8..]);
    assert_eq!(q, want);
    assert_eq!(u64::from_le_bytes(q[..8].try_into().unwrap()), 0xfee0_0000);
    assert_eq!(
        take(&log),
        vec![
            Call::Write {
                index: VFIO_PCI_CONFIG_REGION_INDEX,
                offset: 4,
                data: vec![0, 0]
            },
            Call::Enable {
                index: VFIO_PCI_MSIX_IRQ_INDEX,
                vectors: 4
            }
        ]
    );
    assert_eq!(
        sink.take(),
        vec![(
            1,
            Some(MsiMessage {
                address: 0xfee0_0000,
                data: 0x41
            })
        )],
        "only the unmasked vector is routed"
    );
}

#[test]
fn state_of_another_function_is_refused_and_changes_nothing() {
    let sizes = [1 << 20, 0, 0, 0, 0, 0];
    let (mut src, _, _) = build(edu_like(), sizes, 1, 0);
    src.config_write(4, &0x0006u16.to_le_bytes());
    let state = saved(&src);
    let refuse =
        |config: [u8; 256], sizes: [u64; 6], msi: u32, state: &VfioPciState, want: &str| {
            let (mut dst, log, sink) = build(config, sizes, msi, 0);
            let before = registers(&mut dst);
            let err = dst.restore(state).expect_err("another function");
            assert!(matches!(err, PciStateError::Mismatch { .. }), "{err:?}");
            let msg = err.to_string();
            assert!(
                msg.contains("VFIO device fake") && msg.contains(want),
                "{msg}"
            );
            assert_eq!(registers(&mut dst), before);
            assert!(take(&log).is_empty() && sink.take().is_empty());
        };
    let mut other_ids = edu_like();
    put32(&mut other_ids, 0, 0x11e9_1234);
    refuse(
        other_ids,
        sizes,
        1,
        &state,
        "is 1234:11e8, this one is 1234:11e9",
    );
    refuse(edu_like(), [1 << 21, 0, 0, 0, 0, 0], 1, &state, "BARs");
    refuse(edu_like(), sizes, 0, &state, "MSI");
    let renamed = VfioPciState {
        id: "edu1".into(),
        ..state.clone()
    };
    refuse(edu_like(), sizes, 1, &renamed, "saved from device edu1");
}
