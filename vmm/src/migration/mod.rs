//! The VMM side of live migration: the running [`Machine`](crate::machine::Machine) as the engine's
//! `MigrationHost` (source), a factory that rebuilds it on the destination, the state encoding that
//! travels between them, and vCPU throttling for auto-converge.

pub mod device_map;
pub mod host;
pub mod state_codec;
pub mod target;
pub mod throttle;

/// Maps tern's whole code into this process's page tables before a switchover that will run
/// code this process may never have run (`sys::code_prefault`); `side` names it in the log. A
/// failure costs only the page faults it would have saved.
pub(crate) fn prefault_code(side: &str) {
    let t0 = std::time::Instant::now();
    match crate::sys::code_prefault::populate() {
        Ok(p) => log::info!(
            "{side}: {} KiB of code mapped ahead of the switchover in {} us",
            p.bytes >> 10,
            t0.elapsed().as_micros()
        ),
        Err(e) => log::warn!("{side}: cannot map the code ahead of the switchover: {e}"),
    }
}
