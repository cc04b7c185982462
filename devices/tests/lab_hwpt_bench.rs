//! What `IOMMU_HWPT_GET_DIRTY_BITMAP` costs per GiB mapped, measured on the iommufd selftest mock
//! IOMMU inside the nested lab (`scripts/lab run hwdbm-bench`, boot `mock`: `intel_iommu=off`).
//!
//! A benchmark that prints numbers: it asserts only that every bitmap it reads is exactly right
//! (the pages marked with `IOMMU_TEST_OP_DIRTY` and nothing else; empty after a read-and-clear;
//! unchanged by a `NO_CLEAR` read), never a time. One line per cell, median of [`RUNS`] runs:
//!
//! ```text
//! HWPT-BENCH dirty=1% read=chunks-64MiB mode=clear ms_per_gib=12.3
//! ```
//!
//! - `dirty`: share of the 4 KiB pages marked dirty (both 2 KiB mock IO pages of each);
//! - `read`: one call over the whole mapping, or one call per 64 MiB chunk (as the migration
//!   engine claims chunk by chunk just before sending);
//! - `mode`: `no-clear` (`IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR`, the peek) or `clear` (the claim).
//!
//! It maps 1 GiB of pinned anonymous memory at IOVA 16 MiB (the mock aperture starts there), or
//! 512 MiB / 256 MiB when pinning 1 GiB fails in the lab VM's 4 GiB (the output then says so), and
//! scales to per-GiB. `TERN_HWPT_BENCH_MIB` forces a size. Under TCG the numbers are only relative:
//! the mock walks an xarray per 2 KiB page where real hardware walks page tables.
//!
//! The table goes straight to stdout (not through `println!`), so libtest's output capture does not
//! hide it.

use std::io::Write;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use iommufd_ioctls::IommuFd;
use tern_devices::sys::dma_buffer::{DmaBuffer, IoasMapping};
use tern_devices::sys::iommufd_hwpt_dirty::{self, DirtyRead};
use tern_devices::sys::iommufd_test::{self, MockAccess, MOCK_APERTURE_START, MOCK_IO_PAGE_SIZE};
use tern_devices::sys::iova::Iova;
use tern_devices::vfio::iommufd::alloc_hwpt;

mod lab_common;
use lab_common::ioas_alloc;

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
const CHUNK: u64 = 64 * MIB;
/// Runs per cell; the median is printed.
const RUNS: usize = 3;
/// Mapping sizes tried in turn (MiB): pinning may fail for the larger ones.
const SIZES_MIB: [u64; 3] = [1024, 512, 256];

/// Writes one line to the real stdout, bypassing libtest's capture.
fn out(line: &str) {
    let mut stdout = std::io::stdout().lock();
    // A lost benchmark line is not worth failing the run over.
    let _ = writeln!(stdout, "{line}");
    let _ = stdout.flush();
}

/// An IOAS with a mock device on a dirty-tracking HWPT (tracking on), before anything is mapped:
/// mapping afterwards fills only that one domain.
fn dirty_tracking_ioas(iommufd: &IommuFd) -> Result<(u32, u32)> {
    let ioas = ioas_alloc(iommufd)?;
    let dom = iommufd_test::mock_domain(iommufd, ioas, 0)?;
    let hwpt =
        alloc_hwpt(iommufd, dom.idev_id, ioas, true).context("HWPT_ALLOC(DIRTY_TRACKING)")?;
    iommufd_test::mock_domain_replace(iommufd, dom.stdev_id, hwpt)?;
    iommufd_hwpt_dirty::set_dirty_tracking(iommufd, hwpt, true)?;
    Ok((ioas, hwpt))
}

fn count_bits(bitmap: &[u64]) -> u64 {
    bitmap.iter().map(|w| u64::from(w.count_ones())).sum()
}

fn set_bit(bitmap: &mut [u64], n: u64) {
    bitmap[(n / 64) as usize] |= 1 << (n % 64);
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One dirty level: which 4 KiB pages are marked.
#[derive(Clone, Copy)]
struct Level {
    label: &'static str,
    /// Every `stride`-th page is dirty; `None` for none.
    stride: Option<u64>,
}

const LEVELS: [Level; 3] = [
    Level {
        label: "0%",
        stride: None,
    },
    Level {
        label: "1%",
        stride: Some(100),
    },
    Level {
        label: "100%",
        stride: Some(1),
    },
];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    Whole,
    Chunks,
}

impl Shape {
    fn label(self) -> &'static str {
        match self {
            Shape::Whole => "whole",
            Shape::Chunks => "chunks-64MiB",
        }
    }
}

fn mode_label(mode: DirtyRead) -> &'static str {
    match mode {
        DirtyRead::NoClear => "no-clear",
        DirtyRead::ReadAndClear => "clear",
    }
}

struct Bench<'a> {
    iommufd: &'a IommuFd,
    hwpt: u32,
    iova: Iova,
    len: u64,
    pages: u64,
    bitmap: Vec<u64>,
}

impl Bench<'_> {
    /// Reads the dirty bitmap of the whole mapping into `self.bitmap` as one call or per 64 MiB
    /// chunk; returns the milliseconds the reads took.
    fn read(&mut self, shape: Shape, mode: DirtyRead) -> Result<f64> {
        let (iommufd, hwpt, iova, len) = (self.iommufd, self.hwpt, self.iova, self.len);
        let start = Instant::now();
        match shape {
            Shape::Whole => iommufd_hwpt_dirty::get_dirty_bitmap(
                iommufd,
                hwpt,
                iova,
                len,
                PAGE,
                mode,
                &mut self.bitmap,
            )?,
            Shape::Chunks => {
                let words = (CHUNK / PAGE / 64) as usize;
                for (i, chunk) in self.bitmap.chunks_mut(words).enumerate() {
                    let at = Iova(iova.0 + i as u64 * CHUNK);
                    iommufd_hwpt_dirty::get_dirty_bitmap(
                        iommufd, hwpt, at, CHUNK, PAGE, mode, chunk,
                    )?;
                }
            }
        }
        Ok(start.elapsed().as_secs_f64() * 1e3)
    }

    /// Marks the pages of `level` dirty (both mock IO pages of each); returns the expected bitmap.
    fn mark(&self, level: Level) -> Result<Vec<u64>> {
        let mut expected = vec![0u64; self.bitmap.len()];
        let Some(stride) = level.stride else {
            return Ok(expected);
        };
        let per_page = PAGE / MOCK_IO_PAGE_SIZE;
        let mut mock = vec![0u64; (self.len / MOCK_IO_PAGE_SIZE).div_ceil(64) as usize];
        let mut dirty = 0;
        for p in (0..self.pages).step_by(stride as usize) {
            set_bit(&mut expected, p);
            for half in 0..per_page {
                set_bit(&mut mock, p * per_page + half);
            }
            dirty += 1;
        }
        let marked = iommufd_test::mark_dirty(self.iommufd, self.hwpt, self.iova, self.len, &mock)?;
        ensure!(
            marked == dirty * per_page,
            "IOMMU_TEST_OP_DIRTY marked {marked} mock pages, expected {}",
            dirty * per_page
        );
        Ok(expected)
    }

    /// The bitmap just read must be exactly `expected`.
    fn check(&self, expected: &[u64], what: &str) -> Result<()> {
        if self.bitmap != expected {
            let first = self
                .bitmap
                .iter()
                .zip(expected)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            bail!(
                "{what}: read {} dirty pages, expected {}; first difference in word {first} \
                 ({:#x} read, {:#x} expected)",
                count_bits(&self.bitmap),
                count_bits(expected),
                self.bitmap[first],
                expected[first]
            );
        }
        Ok(())
    }

    /// A clearing read that leaves the whole range clean, checked.
    fn clear_all(&mut self, what: &str) -> Result<()> {
        self.read(Shape::Whole, DirtyRead::ReadAndClear)?;
        self.read(Shape::Whole, DirtyRead::NoClear)?;
        let zero = vec![0u64; self.bitmap.len()];
        self.check(&zero, what)
    }
}

fn run_bench(iommufd: &IommuFd, hwpt: u32, mapping: &IoasMapping<'_>, note: &str) -> Result<()> {
    let len = mapping.len_bytes();
    let pages = len / PAGE;
    let mut bench = Bench {
        iommufd,
        hwpt,
        iova: mapping.iova(),
        len,
        pages,
        bitmap: vec![0u64; pages.div_ceil(64) as usize],
    };
    let per_gib = 1024.0 / (len / MIB) as f64;
    // libtest has printed `test <name> ... ` without a newline: start the table on a line of its own.
    out("");
    out(&format!(
        "HWPT-BENCH mapped_mib={} iova={:#x} page=4KiB chunk=64MiB runs={RUNS} (median) {note}",
        len / MIB,
        mapping.iova()
    ));
    bench.clear_all("initial clear")?;
    let zero = vec![0u64; bench.bitmap.len()];
    for level in LEVELS {
        let expected = bench.mark(level)?;
        // The peek: bits stay, so every run reads the same marks.
        for shape in [Shape::Whole, Shape::Chunks] {
            let mut ms = Vec::with_capacity(RUNS);
            for run in 1..=RUNS {
                ms.push(bench.read(shape, DirtyRead::NoClear)?);
                bench.check(
                    &expected,
                    &format!("dirty={} {} NO_CLEAR run {run}", level.label, shape.label()),
                )?;
            }
            cell(level, shape, DirtyRead::NoClear, median(ms) * per_gib);
        }
        // The claim: mark again before every run, and a second read must be clean.
        for shape in [Shape::Whole, Shape::Chunks] {
            let mut ms = Vec::with_capacity(RUNS);
            for run in 1..=RUNS {
                let what = format!("dirty={} {} clear run {run}", level.label, shape.label());
                bench.mark(level)?;
                ms.push(bench.read(shape, DirtyRead::ReadAndClear)?);
                bench.check(&expected, &what)?;
                bench.read(Shape::Whole, DirtyRead::NoClear)?;
                bench.check(&zero, &format!("{what}: read after the clearing read"))?;
            }
            cell(level, shape, DirtyRead::ReadAndClear, median(ms) * per_gib);
        }
    }
    Ok(())
}

fn cell(level: Level, shape: Shape, mode: DirtyRead, ms_per_gib: f64) {
    out(&format!(
        "HWPT-BENCH dirty={} read={} mode={} ms_per_gib={ms_per_gib:.1}",
        level.label,
        shape.label(),
        mode_label(mode)
    ));
}

#[test]
#[ignore = "lab: needs /dev/iommu with the iommufd selftest (intel_iommu=off); a benchmark"]
fn mock_hwpt_get_dirty_bitmap_cost_per_gib() -> Result<()> {
    let start = Instant::now();
    let iommufd = IommuFd::new().context("opening /dev/iommu")?;
    let (ioas, hwpt) = dirty_tracking_ioas(&iommufd)?;
    let sizes: Vec<u64> = match std::env::var("TERN_HWPT_BENCH_MIB") {
        Ok(v) => vec![v
            .parse()
            .with_context(|| format!("TERN_HWPT_BENCH_MIB={v} is not a number of MiB"))?],
        Err(_) => SIZES_MIB.to_vec(),
    };
    let mut failures = Vec::new();
    for mib in sizes {
        ensure!(
            mib > 0 && (mib * MIB).is_multiple_of(CHUNK),
            "{mib} MiB is not a whole number of 64 MiB chunks"
        );
        let buf = DmaBuffer::new(usize::try_from(mib * MIB)?)?;
        let map_start = Instant::now();
        let mapped = buf.map_ioas(&iommufd, ioas, Iova(MOCK_APERTURE_START));
        match mapped {
            Ok(mapping) => {
                let mut note = format!("map+pin_s={:.1}", map_start.elapsed().as_secs_f64());
                if mib != 1024 {
                    note.push_str(&format!(
                        " REDUCED: measured {mib} MiB, scaled to per-GiB ({})",
                        if failures.is_empty() {
                            "TERN_HWPT_BENCH_MIB".to_string()
                        } else {
                            failures.join("; ")
                        }
                    ));
                }
                run_bench(&iommufd, hwpt, &mapping, &note)?;
                drop(mapping);
                iommufd_hwpt_dirty::set_dirty_tracking(&iommufd, hwpt, false)?;
                out(&format!(
                    "HWPT-BENCH total_s={:.1}",
                    start.elapsed().as_secs_f64()
                ));
                return Ok(());
            }
            Err(e) => failures.push(format!(
                "mapping {mib} MiB failed: {:#}",
                anyhow::Error::new(e)
            )),
        }
    }
    bail!("no size could be mapped: {}", failures.join("; "))
}

/// The selftest access object writes and reads through the IOAS, in pieces above the kernel's
/// 16 MiB bounce limit, and refuses an unmapped IOVA with an error naming the range.
#[test]
#[ignore = "lab: needs /dev/iommu with the iommufd selftest (intel_iommu=off)"]
fn mock_access_writes_and_reads_through_the_ioas() -> Result<()> {
    const LEN: u64 = 32 * MIB;
    let iommufd = IommuFd::new().context("opening /dev/iommu")?;
    let ioas = ioas_alloc(&iommufd)?;
    let _dom = iommufd_test::mock_domain(&iommufd, ioas, 0)?;
    let buf = DmaBuffer::new(usize::try_from(LEN)?)?;
    let mapping = buf.map_ioas(&iommufd, ioas, Iova(MOCK_APERTURE_START))?;
    let access = MockAccess::create(&iommufd, ioas)?;

    // Small, unaligned.
    let at = Iova(mapping.iova().0 + 3 * PAGE + 100);
    let msg = b"tern: written by the kernel, not by KVM";
    access.write(&iommufd, at, msg)?;
    let mut back = vec![0u8; msg.len() + 2];
    access.read(&iommufd, Iova(at.0 - 1), &mut back)?;
    assert_eq!(back[0], 0, "the byte before the write is untouched");
    assert_eq!(&back[1..=msg.len()], msg);
    assert_eq!(
        back[msg.len() + 1],
        0,
        "the byte after the write is untouched"
    );

    // Larger than one ACCESS_RW (16 MiB): split by the wrapper.
    let big: Vec<u8> = (0..17 * MIB + 5).map(|i| (i % 251) as u8).collect();
    let big_at = Iova(mapping.iova().0 + 8 * MIB + 7);
    access.write(&iommufd, big_at, &big)?;
    let mut big_back = vec![0u8; big.len()];
    access.read(&iommufd, big_at, &mut big_back)?;
    assert!(
        big_back == big,
        "17 MiB round trip through the IOAS differs"
    );

    // Past the mapping: the kernel refuses, and the error names the op and the range.
    let past = Iova(mapping.iova().0 + LEN);
    let err = access
        .write(&iommufd, past, msg)
        .expect_err("a write to an unmapped IOVA must fail");
    let text = err.to_string();
    assert!(
        text.contains("writing") && text.contains(&format!("{:#x}", past.0)),
        "error does not name the op and range: {text}"
    );
    drop(access);
    Ok(())
}
