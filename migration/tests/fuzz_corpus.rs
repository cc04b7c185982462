//! The migration decoder fuzz targets on stable: every seed, every checked-in corpus input and
//! every regression (a crash found by `cargo fuzz`, in `fuzz/regressions/`), then deterministic
//! mutations of them. The long libFuzzer runs are described in the README ("Fuzzing").

#[path = "../../fuzz/harness/input.rs"]
mod input;
#[path = "../../fuzz/harness/migration.rs"]
mod migration;

#[test]
fn migration_stream_corpus_and_mutations() {
    let n = input::replay(
        "migration_stream",
        migration::stream_seeds(),
        10_000,
        1 << 16,
        migration::stream,
    );
    assert!(n > 10_000);
}

#[test]
fn migration_frames_corpus_and_mutations() {
    let n = input::replay(
        "migration_frames",
        migration::frame_seeds(),
        10_000,
        4096,
        migration::frames,
    );
    assert!(n > 10_000);
}
