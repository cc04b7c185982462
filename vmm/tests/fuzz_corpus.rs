//! The VMM state decoding fuzz target on stable: seeds, checked-in corpus, regressions (crashes
//! found by `cargo fuzz`, in `fuzz/regressions/`), then deterministic mutations. No KVM needed.

#[path = "../../fuzz/harness/input.rs"]
mod input;
#[path = "../../fuzz/harness/state.rs"]
mod state;

#[test]
fn vmm_state_corpus_and_mutations() {
    state::parse_round_trips();
    let n = input::replay("vmm_state", state::seeds(), 3_000, 1 << 17, state::state);
    assert!(n > 3_000);
}
