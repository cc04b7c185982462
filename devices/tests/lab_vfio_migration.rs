//! tern's VFIO migration v2 device-state layer (`devices/src/vfio/migration`) against the real
//! kernel inside the nested lab (`scripts/lab run vfio-mig-uapi`): the kernel's mtty sample
//! (two mdev instances of type mtty-2, fixed UUIDs from lab/guest/lib.sh) migrates its UART state
//! from one instance to the other. They need `/dev/vfio` and the mdevs, so plain `cargo test`
//! skips them; the lab runs this binary with `--ignored --test-threads=1 --nocapture mtty_`.
//!
//! The proof that state moved: before migration the source's UARTs are programmed (line control,
//! interrupt enable, modem control, scratch) and hold bytes in their loopback FIFO, the
//! destination's are cleared; afterwards the destination reads back exactly that state and those
//! bytes, and still loops bytes back. The negative test shows the comparison fails when the data
//! goes nowhere, and that the destination takes exactly what the stream says.
//!
//! Each device is opened as tern opens an mdev with the type1 backend: its group in a type1
//! container (`VfioContainer` + `VfioDevice::new`). Each test opens and drops its own devices and
//! first brings a device some earlier failure left outside RUNNING back (`recover`). The engine's
//! view (`VfioStateSource` / `VfioStateSink`) is driven the same way, and `VfioPciDevice::open`
//! must bring back a device a dead tern left in RESUMING.

use std::io::{self, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, ensure, Context, Result};
use tern_devices::pci::bar::BarSpec;
use tern_devices::pci::msi::{MsiMessage, MsiRouteError, MsiRouteSink};
use tern_devices::sys::iova::Iova;
use tern_devices::sys::vfio_region_mmap::RegionMapping;
use tern_devices::vfio::container::GuestRamRange;
use tern_devices::vfio::device::{PciResources, ResourceError, VfioPciDevice};
use tern_devices::vfio::dma_space::DmaSpaces;
use tern_devices::vfio::migration::{
    path, DeviceMigration, DeviceMigrationError, MigState, MigrationCaps, ReadEnd, Recovery,
    VfioStateSink, VfioStateSource,
};
use tern_devices::vfio::preflight::HostRoots;
use tern_devices::vfio::spec::{VfioBackend, VfioDeviceSpec};
use tern_migration::engine::{
    DeviceReadEnd, DeviceStateSink, DeviceStateSource, DEVICE_CHUNK_BYTES,
};
use vfio_bindings::bindings::vfio::VFIO_PCI_BAR0_REGION_INDEX;
use vfio_ioctls::{VfioContainer, VfioDevice, VfioOps};
use vmm_sys_util::eventfd::EventFd;

use MigState::*;

/// MTTY_UUIDS in lab/guest/lib.sh.
const MTTY_SRC: &str = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001";
const MTTY_DST: &str = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1002";

/// 16550 registers (offsets in each port's I/O BAR) and bits mtty implements.
const UART_TX_RX: u64 = 0;
const UART_IER: u64 = 1;
const UART_FCR: u64 = 2;
const UART_LCR: u64 = 3;
const UART_MCR: u64 = 4;
const UART_LSR: u64 = 5;
const UART_SCR: u64 = 7;
const LSR_DATA_READY: u8 = 0x01;
/// FIFO enable + clear receive and transmit FIFOs.
const FCR_ENABLE_CLEAR: u8 = 0x07;
/// 8 data bits, parity enabled, even parity (DLAB off).
const LCR_8E1: u8 = 0x1b;
/// Receive-data and line-status interrupts (mtty signals nothing: no IRQ is set up).
const IER_RDI_RLSI: u8 = 0x05;
/// DTR | RTS.
const MCR_DTR_RTS: u8 = 0x03;
/// mtty-2 has a UART behind BAR0 and one behind BAR1.
const PORTS: u32 = 2;

/// The mtty migration stream (samples/vfio-mdev/mtty.c `struct mtty_data`): a 24-byte header
/// (magic, version, nr_ports, flags), then one 36-byte `struct serial_port` per port, each
/// starting with the 8 UART registers.
const MTTY_HEADER: usize = 24;
const MTTY_PORT_STATE: usize = 36;

type Handle = DeviceMigration<Arc<VfioDevice>>;

/// One mtty instance opened as tern opens an mdev with type1. Fields drop in order: the device
/// closes before its container.
struct Mtty {
    mig: Handle,
    _container: Arc<VfioContainer>,
}

impl Mtty {
    fn open(uuid: &str, id: &str) -> Result<Self> {
        let sysfs = Path::new("/sys/bus/mdev/devices").join(uuid);
        if !sysfs.exists() {
            bail!(
                "no mdev {} (the lab creates the MTTY_UUIDS instances before the tests run)",
                sysfs.display()
            );
        }
        let container = Arc::new(VfioContainer::new(None).context("opening /dev/vfio/vfio")?);
        let ops: Arc<dyn VfioOps> = container.clone();
        let device = VfioDevice::new(&sysfs, ops, false)
            .with_context(|| format!("opening {} through a type1 container", sysfs.display()))?;
        let mut mig = DeviceMigration::new(id, Arc::new(device))?;
        let found = mig.state();
        if found != Running {
            // The migration state outlives the fd: mtty keeps whatever an earlier (failed) test
            // left behind across close and open.
            let how = mig.recover()?;
            println!("{id}: found in {found}, recovered: {how:?}");
        }
        Ok(Mtty {
            mig,
            _container: container,
        })
    }

    fn dev(&self) -> &VfioDevice {
        self.mig.device()
    }
}

fn reg_write(dev: &VfioDevice, port: u32, reg: u64, value: u8) {
    dev.region_write(VFIO_PCI_BAR0_REGION_INDEX + port, &[value], reg);
}

fn reg_read(dev: &VfioDevice, port: u32, reg: u64) -> u8 {
    // 0xee: a value no register below holds, should the read fail (vfio-ioctls only logs).
    let mut b = [0xee];
    dev.region_read(VFIO_PCI_BAR0_REGION_INDEX + port, &mut b, reg);
    b[0]
}

/// LCR, IER, MCR and SCR of each port (reading them changes nothing).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Registers(Vec<[u8; 4]>);

fn registers(dev: &VfioDevice) -> Registers {
    Registers(
        (0..PORTS)
            .map(|p| {
                [
                    reg_read(dev, p, UART_LCR),
                    reg_read(dev, p, UART_IER),
                    reg_read(dev, p, UART_MCR),
                    reg_read(dev, p, UART_SCR),
                ]
            })
            .collect(),
    )
}

/// Reads every byte pending in each port's loopback FIFO (this empties it).
fn drain(dev: &VfioDevice) -> Vec<Vec<u8>> {
    (0..PORTS)
        .map(|p| {
            let mut bytes = Vec::new();
            while reg_read(dev, p, UART_LSR) & LSR_DATA_READY != 0 && bytes.len() < 64 {
                bytes.push(reg_read(dev, p, UART_TX_RX));
            }
            bytes
        })
        .collect()
}

fn pending_bytes(port: u32) -> Vec<u8> {
    format!("tern{port}").into_bytes()
}

/// Programs every port: line control, interrupt enable, modem control, scratch = `scratch` +
/// port, and `tern<port>` pending in the loopback FIFO.
fn program(dev: &VfioDevice, scratch: u8) -> Registers {
    for p in 0..PORTS {
        reg_write(dev, p, UART_FCR, FCR_ENABLE_CLEAR);
        reg_write(dev, p, UART_LCR, LCR_8E1);
        reg_write(dev, p, UART_IER, IER_RDI_RLSI);
        reg_write(dev, p, UART_MCR, MCR_DTR_RTS);
        reg_write(dev, p, UART_SCR, scratch + p as u8);
        for b in pending_bytes(p) {
            reg_write(dev, p, UART_TX_RX, b);
        }
    }
    Registers(
        (0..PORTS)
            .map(|p| [LCR_8E1, IER_RDI_RLSI, MCR_DTR_RTS, scratch + p as u8])
            .collect(),
    )
}

/// Clears every port: registers 0, FIFO empty.
fn clear(dev: &VfioDevice) {
    for p in 0..PORTS {
        reg_write(dev, p, UART_FCR, FCR_ENABLE_CLEAR);
        for reg in [UART_LCR, UART_IER, UART_MCR, UART_SCR] {
            reg_write(dev, p, reg, 0);
        }
    }
}

/// The UART still loops a byte back on every port.
fn check_loopback(dev: &VfioDevice, who: &str) -> Result<()> {
    for p in 0..PORTS {
        reg_write(dev, p, UART_TX_RX, b'!');
        let got = drain(dev);
        ensure!(
            got[p as usize] == b"!",
            "{who} port {p}: wrote '!', read back {:?}",
            got[p as usize]
        );
    }
    Ok(())
}

/// A [`Write`] into a RESUMING device: the source's data goes to the destination chunk by chunk,
/// never gathered whole.
struct IntoDevice<'a>(&'a mut Handle);

impl Write for IntoDevice<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write_chunk(buf).map_err(io::Error::other)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// An error and its sources on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(&format!(": {s}"));
        cur = s.source();
    }
    out
}

/// Both devices back in RUNNING, as the kernel reports it.
fn both_running(a: &mut Mtty, b: &mut Mtty) -> Result<()> {
    for m in [a, b] {
        let now = m.mig.refresh_state()?;
        ensure!(now == Running, "{} is in {now}, not RUNNING", m.mig.id());
    }
    Ok(())
}

/// STOP_COPY-only migration (the path the P2P-capable device takes from RUNNING) of `src` into a
/// byte vector: the test's stand-in for the wire.
fn save_stop_copy(src: &mut Mtty) -> Result<Vec<u8>> {
    src.mig.transition_to(StopCopy)?;
    let mut wire = Vec::new();
    let r = src.mig.read_data(&mut wire)?;
    ensure!(r.end == ReadEnd::EndOfStream, "STOP_COPY read ended {r:?}");
    src.mig.transition_to(Running)?;
    Ok(wire)
}

fn restore(dst: &mut Mtty, wire: &[u8]) -> Result<()> {
    dst.mig.transition_to(Resuming)?;
    let n = dst.mig.write_data(&mut &wire[..])?;
    ensure!(n == wire.len() as u64, "wrote {n} of {} bytes", wire.len());
    dst.mig.transition_to(Running)?;
    Ok(())
}

#[test]
#[ignore = "lab: needs /dev/vfio and the lab's mtty mdevs"]
fn mtty_probe_reports_stop_copy_p2p_pre_copy() -> Result<()> {
    let src = Mtty::open(MTTY_SRC, "mtty-src")?;
    let caps = src.mig.caps();
    println!(
        "mtty caps: {caps} = {} (flags {:#x})",
        serde_json::to_string(&caps)?,
        caps.flags()
    );
    assert_eq!(caps, MigrationCaps::ALL);
    assert_eq!(MigrationCaps::probe(src.dev())?, Some(MigrationCaps::ALL));
    assert_eq!(src.mig.state(), Running);
    let size = src.mig.stop_copy_size()?;
    println!("mtty stop_copy_length: {size} bytes");
    assert_eq!(size as usize, MTTY_HEADER + 2 * MTTY_PORT_STATE);
    Ok(())
}

#[test]
#[ignore = "lab: needs /dev/vfio and the lab's mtty mdevs"]
fn mtty_precopy_and_stop_copy_move_the_uart_state_to_the_destination() -> Result<()> {
    let mut a = Mtty::open(MTTY_SRC, "mtty-src")?;
    let mut b = Mtty::open(MTTY_DST, "mtty-dst")?;
    let mut want = program(a.dev(), 0x10);
    assert_eq!(
        registers(a.dev()),
        want,
        "the source reads back what was programmed"
    );
    clear(b.dev());
    assert_ne!(registers(b.dev()), want, "the destination starts different");
    let size = a.mig.stop_copy_size()?;

    let t = Instant::now();
    assert_eq!(b.mig.transition_to(Resuming)?, [RunningP2p, Stop, Resuming]);
    let dst_ready = t.elapsed();

    let t = Instant::now();
    assert_eq!(a.mig.transition_to(PreCopy)?, [PreCopy]);
    let info = a.mig.precopy_info()?;
    println!("PRE_COPY info: {info:?} (stop_copy_length {size})");
    assert!(info.initial_bytes > 0, "mtty has initial pre-copy bytes");
    // Pre-copy data goes to the destination while the source device still runs.
    let pre = a.mig.read_data(&mut IntoDevice(&mut b.mig))?;
    assert_eq!(pre.end, ReadEnd::NoDataNow);
    assert_eq!(pre.bytes, info.initial_bytes);
    assert_eq!(
        a.mig.precopy_info()?.initial_bytes,
        0,
        "initial bytes all read"
    );
    let precopy_time = t.elapsed();

    // The device still runs in PRE_COPY: a change now must arrive too.
    reg_write(a.dev(), 0, UART_SCR, 0x5a);
    want.0[0][3] = 0x5a;

    let t = Instant::now();
    let arcs = a.mig.transition_to(StopCopy)?;
    assert_eq!(
        arcs,
        [PreCopyP2p, StopCopy],
        "P2P first, as the path function says"
    );
    assert!(
        a.mig.has_data_fd(),
        "the pre-copy fd carries the stop-copy data"
    );
    let rest = a.mig.read_data(&mut IntoDevice(&mut b.mig))?;
    assert_eq!(rest.end, ReadEnd::EndOfStream);
    assert_eq!(a.mig.transition_to(Running)?, [Stop, RunningP2p, Running]);
    let stop_copy_time = t.elapsed();
    assert_eq!(
        pre.bytes + rest.bytes,
        size,
        "stream length = stop_copy_length"
    );

    let t = Instant::now();
    assert_eq!(b.mig.transition_to(Running)?, [Stop, RunningP2p, Running]);
    let dst_resume = t.elapsed();
    both_running(&mut a, &mut b)?;

    let (sa, sb) = (a.mig.stats(), b.mig.stats());
    println!(
        "mtty migration: pre-copy {} B in {:?}, stop-copy {} B, STOP_COPY {} us, source switchover {:?}; \
         destination to RESUMING {:?}, resumed {} B, to RUNNING {:?}",
        sa.precopy_bytes,
        precopy_time,
        sa.stop_copy_bytes,
        sa.stop_copy_us,
        stop_copy_time,
        dst_ready,
        sb.resumed_bytes,
        dst_resume
    );
    assert_eq!(sb.resumed_bytes, size);
    assert_eq!((sa.resets, sb.resets), (0, 0));

    let got = registers(b.dev());
    println!("destination registers (LCR, IER, MCR, SCR per port): {got:?}");
    assert_eq!(
        got, want,
        "the destination's UART registers are the source's"
    );
    assert_eq!(registers(a.dev()), want, "the source is unchanged");
    let pending: Vec<Vec<u8>> = (0..PORTS).map(pending_bytes).collect();
    assert_eq!(
        drain(b.dev()),
        pending,
        "the bytes pending at the source arrived"
    );
    assert_eq!(
        drain(a.dev()),
        pending,
        "and are still pending at the source"
    );
    check_loopback(b.dev(), "destination")?;
    check_loopback(a.dev(), "source")?;
    Ok(())
}

#[test]
#[ignore = "lab: needs /dev/vfio and the lab's mtty mdevs"]
fn mtty_p2p_switchover_quiesces_both_devices_before_stop_copy() -> Result<()> {
    let mut a = Mtty::open(MTTY_SRC, "mtty-src")?;
    let mut b = Mtty::open(MTTY_DST, "mtty-dst")?;
    let caps = a.mig.caps();
    let chosen = path(Running, StopCopy, caps)?;
    println!("path RUNNING -> STOP_COPY with {caps}: {chosen:?}");
    assert_eq!(chosen, [RunningP2p, Stop, StopCopy]);
    let no_p2p = MigrationCaps { p2p: false, ..caps };
    assert_eq!(path(Running, StopCopy, no_p2p)?, [Stop, StopCopy]);

    let want = program(a.dev(), 0x30);
    program(b.dev(), 0x40);
    // Switchover with several devices: every device to RUNNING_P2P first, then each stops.
    assert_eq!(a.mig.transition_to(RunningP2p)?, [RunningP2p]);
    assert_eq!(b.mig.transition_to(RunningP2p)?, [RunningP2p]);
    let t = Instant::now();
    let rest = a.mig.transition_to(StopCopy)?;
    assert_eq!([vec![RunningP2p], rest].concat(), chosen);
    let mut wire = Vec::new();
    let r = a.mig.read_data(&mut wire)?;
    assert_eq!(r.end, ReadEnd::EndOfStream);
    assert_eq!(r.bytes, a.mig.stop_copy_size()?);
    a.mig.transition_to(Running)?;
    println!(
        "P2P switchover: {} B read in STOP_COPY ({} us in STOP_COPY), source back in RUNNING after {:?}",
        r.bytes,
        a.mig.stats().stop_copy_us,
        t.elapsed()
    );

    assert_eq!(b.mig.transition_to(Resuming)?, [Stop, Resuming]);
    assert_eq!(b.mig.write_data(&mut wire.as_slice())?, r.bytes);
    assert_eq!(b.mig.transition_to(Running)?, [Stop, RunningP2p, Running]);
    both_running(&mut a, &mut b)?;
    assert_eq!(registers(b.dev()), want);
    let pending: Vec<Vec<u8>> = (0..PORTS).map(pending_bytes).collect();
    assert_eq!(drain(b.dev()), pending);
    drain(a.dev());
    Ok(())
}

#[test]
#[ignore = "lab: needs /dev/vfio and the lab's mtty mdevs"]
fn mtty_corrupt_stream_is_refused_the_device_is_reset_and_migrates_again() -> Result<()> {
    let mut a = Mtty::open(MTTY_SRC, "mtty-src")?;
    let mut b = Mtty::open(MTTY_DST, "mtty-dst")?;
    b.mig.transition_to(Resuming)?;
    let junk = [0x5au8; 64];
    let err = b
        .mig
        .write_data(&mut &junk[..])
        .expect_err("mtty refuses a stream with a bad header");
    println!("corrupt stream: {}", chain(&err));
    assert_eq!(err.errno(), Some(libc::EFAULT), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("mtty-dst") && msg.contains("RESUMING"),
        "{msg}"
    );
    assert!(
        matches!(err, DeviceMigrationError::DataWrite { .. }),
        "{err:?}"
    );

    // Leaving RESUMING would load the partial stream: mtty refuses it, and stays in RESUMING.
    let err = b
        .mig
        .transition_to(Running)
        .expect_err("RESUMING -> STOP with a partial stream");
    println!("leaving RESUMING: {}", chain(&err));
    let msg = err.to_string();
    assert!(
        msg.contains("mtty-dst") && msg.contains("RESUMING -> STOP"),
        "{msg}"
    );
    assert_eq!(
        b.mig.state(),
        Resuming,
        "the kernel reports where the device is"
    );

    let t = Instant::now();
    assert_eq!(b.mig.recover()?, Recovery::Reset);
    println!("VFIO_DEVICE_RESET took {:?}", t.elapsed());
    assert!(b.mig.was_reset());
    assert_eq!(b.mig.stats().resets, 1);
    assert!(!b.mig.has_data_fd());
    both_running(&mut a, &mut b)?;

    // Usable again: a correct migration into the reset device succeeds.
    let want = program(a.dev(), 0x70);
    clear(b.dev());
    let wire = save_stop_copy(&mut a)?;
    restore(&mut b, &wire)?;
    both_running(&mut a, &mut b)?;
    assert_eq!(registers(b.dev()), want);
    let pending: Vec<Vec<u8>> = (0..PORTS).map(pending_bytes).collect();
    assert_eq!(drain(b.dev()), pending);
    check_loopback(b.dev(), "reset destination")?;
    drain(a.dev());
    Ok(())
}

#[test]
#[ignore = "lab: needs /dev/vfio and the lab's mtty mdevs"]
fn mtty_destination_state_is_exactly_what_the_stream_carried() -> Result<()> {
    let mut a = Mtty::open(MTTY_SRC, "mtty-src")?;
    let mut b = Mtty::open(MTTY_DST, "mtty-dst")?;
    let want = program(a.dev(), 0x90);
    clear(b.dev());
    let wire = save_stop_copy(&mut a)?;

    // Data read but written to nothing: the check used above must fail.
    assert_ne!(
        registers(b.dev()),
        want,
        "without the data the destination must differ"
    );

    // The stream's port states start with the UART registers: flip the first port's scratch.
    let scr0 = MTTY_HEADER + UART_SCR as usize;
    let scr1 = MTTY_HEADER + MTTY_PORT_STATE + UART_SCR as usize;
    ensure!(
        wire.len() == MTTY_HEADER + 2 * MTTY_PORT_STATE && wire[scr0] == 0x90 && wire[scr1] == 0x91,
        "unexpected mtty stream layout: {wire:02x?}"
    );
    let mut tampered = wire.clone();
    tampered[scr0] ^= 0xff;
    restore(&mut b, &tampered)?;
    let mut expect = want.clone();
    expect.0[0][3] = 0x90 ^ 0xff;
    let got = registers(b.dev());
    println!("tampered scratch byte: destination registers {got:?}");
    assert_eq!(got, expect, "the destination took the stream byte for byte");
    assert_ne!(got, want);
    drain(a.dev());
    drain(b.dev());
    Ok(())
}

/// Moves the source's whole stream into `sink` as the engine does: chunks of at most
/// [`DEVICE_CHUNK_BYTES`] read until `until`, each written as it is read. Returns the bytes moved.
fn pump_chunks(
    src: &mut dyn DeviceStateSource,
    sink: &mut dyn DeviceStateSink,
    until: DeviceReadEnd,
) -> Result<usize> {
    let mut moved = 0;
    loop {
        let mut chunk = Vec::new();
        let end = src.read_chunk(&mut chunk).map_err(|e| anyhow!(chain(&e)))?;
        ensure!(
            chunk.len() <= DEVICE_CHUNK_BYTES,
            "chunk of {}",
            chunk.len()
        );
        sink.write(&chunk).map_err(|e| anyhow!(chain(&e)))?;
        moved += chunk.len();
        if end == until {
            return Ok(moved);
        }
        ensure!(end == DeviceReadEnd::ChunkFull, "read ended {end:?}");
    }
}

#[test]
#[ignore = "lab: needs /dev/vfio and the lab's mtty mdevs"]
fn mtty_engine_adapters_move_the_uart_state() -> Result<()> {
    let a = Mtty::open(MTTY_SRC, "mtty-src")?;
    let b = Mtty::open(MTTY_DST, "mtty-dst")?;
    let want = program(a.dev(), 0x30);
    clear(b.dev());
    let h = |e: tern_migration::engine::HostError| anyhow!(chain(&e));
    // The destination knows the device by the source's id.
    let mut src = VfioStateSource::new("mtty0", a.mig.device().clone())?;
    let mut sink = VfioStateSink::new("mtty0", b.mig.device().clone())?;
    assert!(src.has_precopy() && src.has_p2p());
    assert_eq!(sink.id(), src.id());

    sink.begin().map_err(h)?;
    src.start().map_err(h)?;
    let pending = src.pending().map_err(h)?;
    println!("adapter pending at start: {pending:?}");
    assert_eq!(pending.initial_bytes, MTTY_HEADER as u64);
    assert_eq!(
        pending.stop_copy_bytes,
        (MTTY_HEADER + 2 * MTTY_PORT_STATE) as u64
    );
    let pre = pump_chunks(&mut src, &mut sink, DeviceReadEnd::NoDataNow)?;
    assert_eq!(pre, MTTY_HEADER);
    assert_eq!(src.pending().map_err(h)?.initial_bytes, 0);

    src.quiesce_p2p().map_err(h)?;
    assert_eq!(src.handle().state(), PreCopyP2p);
    src.stop_copy().map_err(h)?;
    let rest = pump_chunks(&mut src, &mut sink, DeviceReadEnd::EndOfStream)?;
    assert_eq!(rest, 2 * MTTY_PORT_STATE);
    src.finish().map_err(h)?;
    assert_eq!(src.handle().state(), Stop);

    sink.end().map_err(h)?;
    sink.run_p2p().map_err(h)?;
    assert_eq!(sink.handle().state(), RunningP2p);
    sink.run().map_err(h)?;
    assert_eq!(
        registers(b.dev()),
        want,
        "the destination reads the source's UARTs"
    );
    assert_eq!(
        drain(b.dev()),
        (0..PORTS).map(pending_bytes).collect::<Vec<_>>(),
        "the pending bytes arrived"
    );
    check_loopback(b.dev(), "destination")?;
    let stats = (src.stats(), sink.stats());
    println!(
        "adapter stats: source {:?}, destination {:?}",
        stats.0, stats.1
    );
    assert_eq!(stats.0.precopy_bytes + stats.0.stop_copy_bytes, 96);
    assert_eq!(stats.1.resumed_bytes, 96);

    // A source that finished (STOP) is brought back by walking, without a reset.
    assert!(!src.recover().map_err(h)?, "walked back, not reset");
    assert_eq!(src.handle().state(), Running);
    // A destination that took a corrupt stream is reset.
    sink.begin().map_err(h)?;
    let refused = sink
        .write(&[0xff; 96])
        .and_then(|()| sink.end())
        .expect_err("mtty refuses a stream without its magic");
    println!("corrupt stream: {}", chain(&refused));
    assert!(sink.recover().map_err(h)?);
    assert_eq!(sink.handle().state(), Running);
    Ok(())
}

/// BARs from a bump allocator and vectors nobody routes: what a function needs to open outside
/// a VM.
struct NoVm {
    next: u64,
}

struct NoRoutes;

impl MsiRouteSink for NoRoutes {
    fn set_route(&self, _: u16, _: Option<MsiMessage>) -> Result<(), MsiRouteError> {
        Ok(())
    }
}

impl PciResources for NoVm {
    fn allocate_bar(&mut self, spec: &BarSpec) -> Result<u64, ResourceError> {
        let addr = self.next.next_multiple_of(spec.size.max(4096));
        self.next = addr + spec.size;
        Ok(addr)
    }
    fn msi_vectors(
        &mut self,
        count: u16,
    ) -> Result<(Arc<dyn MsiRouteSink>, Vec<EventFd>), ResourceError> {
        let fds = (0..count)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<Result<_, _>>()?;
        Ok((Arc::new(NoRoutes), fds))
    }
}

#[test]
#[ignore = "lab: needs /dev/vfio and the lab's mtty mdevs"]
fn mtty_left_resuming_is_reset_when_tern_opens_it() -> Result<()> {
    // A tern that died mid-migration leaves the destination's device in RESUMING.
    let mut b = Mtty::open(MTTY_DST, "mtty-dst")?;
    b.mig.transition_to(Resuming)?;
    drop(b);

    // tern's open of the function: mtty has no VFIO_DEVICE_FLAGS_RESET, so vfio-ioctls' reset
    // skips it; the open must reset it through the migration uAPI.
    let ram = RegionMapping::anonymous(2 << 20)?;
    let spec = VfioDeviceSpec {
        path: Path::new("/sys/bus/mdev/devices").join(MTTY_DST),
        id: "mtty0".into(),
        backend: VfioBackend::Type1,
        dirty: Default::default(),
    };
    let mut spaces = DmaSpaces::new(vec![GuestRamRange {
        iova: Iova(0),
        host_addr: ram.host_addr() as usize,
        len: ram.len(),
    }]);
    let dev = VfioPciDevice::open(
        &spec,
        &HostRoots::default(),
        &mut spaces,
        &mut NoVm { next: 0xc000_0000 },
    )
    .map_err(|e| anyhow!(chain(&e)))?;
    let info = dev.info().clone();
    println!(
        "opened: migration {:?}, PCI {:04x}:{:04x}",
        info.migration, info.vendor_id, info.device_id
    );
    assert_eq!(info.migration, Some(MigrationCaps::ALL));
    assert!(dev.state_source()?.is_some() && dev.state_sink()?.is_some());
    drop(dev);
    drop(spaces);

    let container = Arc::new(VfioContainer::new(None)?);
    let device = VfioDevice::new(
        &Path::new("/sys/bus/mdev/devices").join(MTTY_DST),
        container.clone() as Arc<dyn VfioOps>,
        false,
    )?;
    let found = DeviceMigration::new("mtty-dst", Arc::new(device))?.state();
    ensure!(
        found == Running,
        "after tern's open the device is in {found}"
    );
    Ok(())
}
