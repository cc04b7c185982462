//! Dirty harvest + union + coalesce, ns per guest page, on a synthetic 16 GiB guest with two
//! sources (kernel-format bitmaps, like KVM_GET_DIRTY_LOG and IOMMU_HWPT_GET_DIRTY_BITMAP) at
//! 0.1 %, 10 % and 100 % dirty. Runs the engine's real path: per 64 MiB chunk, `claim_union` (each
//! source ORs and clears its words) and `DirtyRanges::fill_from`. Target ≤ 5 ns/page.
//!
//! Run: `cargo bench -p tern-migration --bench harvest`

use std::hint::black_box;
use std::time::Instant;

use tern_migration::dirty::{
    claim_union, DirtyBitmap, DirtyRanges, DirtySource, DirtySourceError, GpaRange, SourceKind,
    PAGE_SIZE,
};
use vm_memory::GuestAddress;

const GUEST_BYTES: u64 = 16 << 30;
const CHUNK_BYTES: u64 = 64 << 20;

/// A source holding a kernel-format bitmap of the whole guest; claim = OR + clear of the chunk's
/// words, as KVM_CLEAR_DIRTY_LOG / a read-and-clear IOMMU bitmap would do.
struct WordSource {
    kind: SourceKind,
    words: Vec<u64>,
}

impl DirtySource for WordSource {
    fn kind(&self) -> SourceKind {
        self.kind
    }
    fn label(&self) -> &str {
        self.kind.as_str()
    }
    fn start(&mut self) -> Result<(), DirtySourceError> {
        Ok(())
    }
    fn stop(&mut self) -> Result<(), DirtySourceError> {
        Ok(())
    }
    fn sync(&mut self) -> Result<(), DirtySourceError> {
        Ok(())
    }
    fn peek(&mut self, _: GpaRange, _: &mut DirtyBitmap) -> Result<bool, DirtySourceError> {
        Ok(false)
    }
    fn claim(&mut self, r: GpaRange, out: &mut DirtyBitmap) -> Result<(), DirtySourceError> {
        let first = (r.start.0 / PAGE_SIZE) as usize / 64;
        let n = r.pages().div_ceil(64) as usize;
        let w = &mut self.words[first..first + n];
        out.or_words(0, w)
            .map_err(|source| DirtySourceError::OutputBitmap {
                kind: self.kind,
                range: r,
                source,
            })?;
        w.fill(0);
        Ok(())
    }
}

fn synth(pages: u64, permille: u64, seed: u64) -> Vec<u64> {
    let mut x = seed;
    let mut words = vec![0u64; pages.div_ceil(64) as usize];
    if permille >= 1000 {
        words.fill(u64::MAX);
        return words;
    }
    for p in 0..pages {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if x % 1000 < permille {
            words[(p / 64) as usize] |= 1 << (p % 64);
        }
    }
    words
}

/// VmmWriteSource over the GuestPageBitmap: one sync (a harvest of the groups written) and the claims of every chunk from the harvested words.
fn vmm_source(permille: u64) -> f64 {
    use tern_migration::dirty::GuestPageBitmap;
    use vm_memory::bitmap::Bitmap;
    use vm_memory::{GuestMemoryBackend, GuestMemoryMmap};
    let mem: GuestMemoryMmap<GuestPageBitmap> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), GUEST_BYTES as usize)])
            .expect("16 GiB of address space (never touched)");
    let mut src = tern_migration::dirty::VmmWriteSource::new(&mem).expect("4 KiB pages");
    src.start().expect("start");
    let words = synth(GUEST_BYTES / PAGE_SIZE, permille, 0x5555_aaaa_1234_4321);
    let region = mem.iter().next().expect("one region");
    let bm = region.get_mmap();
    for (j, w) in words.iter().enumerate() {
        let mut rest = *w;
        while rest != 0 {
            let b = rest.trailing_zeros() as usize;
            rest &= rest - 1;
            bm.bitmap().mark_dirty((j * 64 + b) * PAGE_SIZE as usize, 1);
        }
    }
    let mut sources: Vec<Box<dyn DirtySource>> = vec![Box::new(src)];
    let t = Instant::now();
    sources[0].sync().expect("sync");
    let mut off = 0;
    while off < GUEST_BYTES {
        let range = GpaRange::new(GuestAddress(off), CHUNK_BYTES);
        black_box(claim_union(&mut sources, range, |_, _| {}).expect("claim"));
        off += CHUNK_BYTES;
    }
    t.elapsed().as_secs_f64() * 1e9 / (GUEST_BYTES / PAGE_SIZE) as f64
}

fn main() {
    let pages = GUEST_BYTES / PAGE_SIZE;
    println!("harvest+union+coalesce, 16 GiB guest, 2 sources, 64 MiB chunks");
    println!(
        "{:>8} {:>12} {:>12} {:>10} {:>10}",
        "dirty", "dirty pages", "runs", "ms/pass", "ns/page"
    );
    // Density in tenths of a percent (permille): 0.1 %, 10 %, 100 %.
    for (label, permille) in [("0.1%", 1u64), ("10%", 100), ("100%", 1000)] {
        let a = synth(pages, permille, 0x1234_5678_9abc_def1);
        let b = synth(pages, permille, 0x0fed_cba9_8765_4321);
        let mut best = f64::MAX;
        let mut dirty = 0;
        let mut runs = 0;
        for _ in 0..5 {
            let mut sources: Vec<Box<dyn DirtySource>> = vec![
                Box::new(WordSource {
                    kind: SourceKind::Kvm,
                    words: a.clone(),
                }),
                Box::new(WordSource {
                    kind: SourceKind::Dma,
                    words: b.clone(),
                }),
            ];
            let mut ranges = DirtyRanges::default();
            let (mut d, mut r) = (0u64, 0usize);
            let t = Instant::now();
            let mut off = 0;
            while off < GUEST_BYTES {
                let range = GpaRange::new(GuestAddress(off), CHUNK_BYTES);
                let u = claim_union(&mut sources, range, |_, n| {
                    black_box(n);
                })
                .expect("claim");
                ranges.fill_from(&u);
                d += ranges.pages();
                r += ranges.runs().len();
                black_box(ranges.runs());
                off += CHUNK_BYTES;
            }
            let el = t.elapsed().as_secs_f64();
            best = best.min(el);
            dirty = d;
            runs = r;
        }
        println!(
            "{:>8} {:>12} {:>12} {:>10.2} {:>10.3}",
            label,
            dirty,
            runs,
            best * 1e3,
            best * 1e9 / pages as f64
        );
    }
    println!("VmmWriteSource (GuestPageBitmap harvested by marked group) sync + claim of 16 GiB:");
    for (label, permille) in [("0.1%", 1u64), ("10%", 100)] {
        println!("{:>8} {:>10.3} ns/page", label, vmm_source(permille));
    }
}
