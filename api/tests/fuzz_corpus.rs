//! The API fuzz targets on stable: seeds, checked-in corpus, regressions (crashes found by
//! `cargo fuzz`, in `fuzz/regressions/`), then deterministic mutations.

#[path = "../../fuzz/harness/api.rs"]
mod api;
#[path = "../../fuzz/harness/input.rs"]
mod input;

#[test]
fn api_body_corpus_and_mutations() {
    let n = input::replay("api_body", api::body_seeds(), 20_000, 4096, api::body);
    assert!(n > 20_000);
}

#[test]
fn api_request_corpus_and_mutations() {
    api::seeds_are_answered();
    let n = input::replay(
        "api_request",
        api::request_seeds(),
        2_000,
        8192,
        api::request,
    );
    assert!(n > 2_000);
}
