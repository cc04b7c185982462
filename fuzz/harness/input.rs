//! Shared by the libFuzzer targets (`fuzz/`) and their stable corpus replay (`cargo test`): a
//! reader that turns fuzz bytes into choices, a deterministic mutator, and the replay loop.
//! std only, so every workspace crate's tests can include it with `#[path]`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// Fuzz bytes read as a sequence of choices; past the end every read yields zero.
#[derive(Debug)]
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((b, rest)) => {
                self.data = rest;
                *b
            }
            None => 0,
        }
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | u64::from(self.u32()) << 32
    }

    /// A value in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.u32() as usize) % n.max(1)
    }

    pub fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }

    /// Up to `max` bytes (length first).
    pub fn bytes(&mut self, max: usize) -> &'a [u8] {
        let n = self.below(max + 1).min(self.data.len());
        let (b, rest) = self.data.split_at(n);
        self.data = rest;
        b
    }

    /// Everything not read yet.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }
}

/// xorshift64: the stable replay's mutations are the same on every run and machine.
#[derive(Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const INTERESTING: [u64; 10] = [
    0,
    1,
    0x7f,
    0xff,
    0xffff,
    0x1000,
    0x7fff_ffff,
    0xffff_ffff,
    0x0400_0001,
    u64::MAX,
];

/// A libFuzzer-like byte mutation of `base` (`other` for splicing).
pub fn mutate(rng: &mut Rng, base: &[u8], other: &[u8], max_len: usize) -> Vec<u8> {
    let mut b = base.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = b.len();
        match rng.below(8) {
            0 if len > 0 => {
                let i = rng.below(len);
                b[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                b[i] = rng.next() as u8;
            }
            2 if len > 0 => {
                // An interesting little-endian value over 1, 2, 4 or 8 bytes.
                let w = 1 << rng.below(4);
                let i = rng.below(len);
                let v = INTERESTING[rng.below(INTERESTING.len())].to_le_bytes();
                for (k, byte) in v.iter().take(w).enumerate() {
                    if let Some(slot) = b.get_mut(i + k) {
                        *slot = *byte;
                    }
                }
            }
            3 if len > 0 => b.truncate(rng.below(len)),
            4 if len > 0 => {
                let i = rng.below(len);
                let n = rng.below(len - i + 1);
                b.drain(i..i + n);
            }
            5 => {
                let i = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let fill: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                b.splice(i..i, fill);
            }
            6 if len > 0 => {
                // Duplicate a range (repeats frames, fields, JSON members).
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(256));
                let copy = b[i..i + n].to_vec();
                let at = rng.below(len + 1);
                b.splice(at..at, copy);
            }
            _ if !other.is_empty() => {
                let i = rng.below(other.len());
                let n = 1 + rng.below(other.len() - i);
                let at = rng.below(len + 1);
                b.splice(at..at, other[i..i + n].iter().copied());
            }
            _ => {}
        }
    }
    b.truncate(max_len);
    b
}

/// `fuzz/` beside the workspace crates.
pub fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn files_in(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_file())
        .map(|e| {
            let data = std::fs::read(e.path()).expect("read corpus file");
            (e.path(), data)
        })
        .collect();
    out.sort();
    out
}

/// Runs `target` on: the generated seeds, the checked-in corpus (`fuzz/corpus/NAME`), every
/// regression input (`fuzz/regressions/NAME`, crashes found earlier), then `mutations`
/// deterministic mutations of all of them. With `TERN_FUZZ_WRITE_SEEDS=1` the generated seeds are
/// (re)written into the corpus first. Returns how many inputs ran.
pub fn replay(
    name: &str,
    seeds: Vec<Vec<u8>>,
    mutations: usize,
    max_len: usize,
    target: impl Fn(&[u8]),
) -> usize {
    let corpus_dir = fuzz_dir().join("corpus").join(name);
    if std::env::var_os("TERN_FUZZ_WRITE_SEEDS").is_some() {
        std::fs::create_dir_all(&corpus_dir).expect("create corpus dir");
        for (i, s) in seeds.iter().enumerate() {
            std::fs::write(corpus_dir.join(format!("seed-{i:03}")), s).expect("write seed");
        }
    }
    let checked_in = files_in(&corpus_dir);
    assert!(
        !checked_in.is_empty(),
        "no seed corpus at {corpus_dir:?}: run with TERN_FUZZ_WRITE_SEEDS=1"
    );
    let regressions = files_in(&fuzz_dir().join("regressions").join(name));
    let mut inputs: Vec<Vec<u8>> = seeds;
    inputs.extend(checked_in.into_iter().map(|(_, d)| d));
    inputs.extend(regressions.into_iter().map(|(_, d)| d));
    for input in &inputs {
        target(input);
    }
    let mut rng = Rng::new(0x7e57_f022 ^ name.len() as u64);
    for i in 0..mutations {
        let base = &inputs[rng.below(inputs.len())];
        let other = &inputs[rng.below(inputs.len())];
        let m = mutate(&mut rng, base, other, max_len);
        // A failing mutation is reported with its bytes so it can be saved as a regression.
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| target(&m)));
        if let Err(p) = run {
            eprintln!("{name}: mutation {i} panicked; input (hex): {}", hex(&m));
            std::panic::resume_unwind(p);
        }
    }
    inputs.len() + mutations
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
