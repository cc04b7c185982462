//! The VFIO migration v2 device states and the one place that decides which arcs exist.
//!
//! A device changes state only along *arcs* its driver implements; the kernel's
//! `vfio_mig_get_next_state()` (drivers/vfio/vfio_main.c) computes, for a current and a wanted
//! state, the next arc to take given the device's capability flags, skipping states the device
//! lacks. [`next_arc`] is that function, table for table; [`path`] repeats it until the wanted
//! state, so tern asks the kernel for one arc at a time and knows exactly which arc failed and
//! where the device stopped. [`check_arc`] accepts a single arc iff the kernel would take it as
//! one step. Nothing else in tern decides arcs.
//!
//! ```text
//!            ┌──────── PRE_COPY ◄────────┐           (PRE_COPY and P2P both: PRE_COPY_P2P
//!            ▼            │ (no P2P)      │            sits between PRE_COPY, RUNNING_P2P and
//!         RUNNING ────────┼──────► RUNNING_P2P       STOP_COPY; STOP_COPY → PRE_COPY* never)
//!            │ (no P2P)   ▼               │
//!            └──────►   STOP  ◄───────────┘
//!                      ▲ │ ▲ │
//!          RESUMING ───┘ │ │ └──► STOP_COPY
//!                 ◄──────┘ └─────────┘
//! ```

use std::fmt;

use serde::{Deserialize, Serialize};
use vfio_bindings::bindings::vfio::{
    vfio_device_mig_state_VFIO_DEVICE_STATE_ERROR as RAW_ERROR,
    vfio_device_mig_state_VFIO_DEVICE_STATE_PRE_COPY as RAW_PRE_COPY,
    vfio_device_mig_state_VFIO_DEVICE_STATE_PRE_COPY_P2P as RAW_PRE_COPY_P2P,
    vfio_device_mig_state_VFIO_DEVICE_STATE_RESUMING as RAW_RESUMING,
    vfio_device_mig_state_VFIO_DEVICE_STATE_RUNNING as RAW_RUNNING,
    vfio_device_mig_state_VFIO_DEVICE_STATE_RUNNING_P2P as RAW_RUNNING_P2P,
    vfio_device_mig_state_VFIO_DEVICE_STATE_STOP as RAW_STOP,
    vfio_device_mig_state_VFIO_DEVICE_STATE_STOP_COPY as RAW_STOP_COPY,
};

use super::caps::MigrationCaps;

/// A device migration state (`enum vfio_device_mig_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MigState {
    /// The device failed a transition and must be reset (`VFIO_DEVICE_RESET`).
    Error,
    /// Stopped: no DMA, no interrupts, internal state frozen.
    Stop,
    /// Normal operation.
    Running,
    /// Stopped, its state readable from the data fd until end of stream.
    StopCopy,
    /// Stopped, taking a saved state through the data fd.
    Resuming,
    /// Running but initiating no peer-to-peer DMA.
    RunningP2p,
    /// Running, its state already readable from the data fd.
    PreCopy,
    /// PRE_COPY without initiating peer-to-peer DMA.
    PreCopyP2p,
}

impl MigState {
    /// Every state, in uAPI value order.
    pub const ALL: [MigState; 8] = [
        MigState::Error,
        MigState::Stop,
        MigState::Running,
        MigState::StopCopy,
        MigState::Resuming,
        MigState::RunningP2p,
        MigState::PreCopy,
        MigState::PreCopyP2p,
    ];

    /// The uAPI value.
    pub const fn raw(self) -> u32 {
        match self {
            MigState::Error => RAW_ERROR,
            MigState::Stop => RAW_STOP,
            MigState::Running => RAW_RUNNING,
            MigState::StopCopy => RAW_STOP_COPY,
            MigState::Resuming => RAW_RESUMING,
            MigState::RunningP2p => RAW_RUNNING_P2P,
            MigState::PreCopy => RAW_PRE_COPY,
            MigState::PreCopyP2p => RAW_PRE_COPY_P2P,
        }
    }

    /// The state of uAPI value `raw`, if tern knows it.
    pub fn from_raw(raw: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.raw() == raw)
    }

    /// The uAPI name (`VFIO_DEVICE_STATE_<name>`).
    pub const fn name(self) -> &'static str {
        match self {
            MigState::Error => "ERROR",
            MigState::Stop => "STOP",
            MigState::Running => "RUNNING",
            MigState::StopCopy => "STOP_COPY",
            MigState::Resuming => "RESUMING",
            MigState::RunningP2p => "RUNNING_P2P",
            MigState::PreCopy => "PRE_COPY",
            MigState::PreCopyP2p => "PRE_COPY_P2P",
        }
    }

    /// States in which the device's data fd is read (saving).
    pub const fn is_saving(self) -> bool {
        matches!(
            self,
            MigState::PreCopy | MigState::PreCopyP2p | MigState::StopCopy
        )
    }

    /// PRE_COPY or PRE_COPY_P2P: the stream has a temporary end while the device runs.
    pub const fn is_precopy(self) -> bool {
        matches!(self, MigState::PreCopy | MigState::PreCopyP2p)
    }

    /// States with a data stream: the saving ones and RESUMING.
    pub const fn has_data_stream(self) -> bool {
        self.is_saving() || matches!(self, MigState::Resuming)
    }

    /// The device may initiate DMA or interrupts (RUNNING, PRE_COPY) or at least answer peers
    /// (the P2P states).
    pub const fn is_running(self) -> bool {
        matches!(
            self,
            MigState::Running | MigState::PreCopy | MigState::RunningP2p | MigState::PreCopyP2p
        )
    }

    const fn index(self) -> usize {
        self.raw() as usize
    }
}

impl fmt::Display for MigState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a wanted state or arc is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// `from -> to` is not one arc: the kernel would go through `via` first.
    #[error("{from} -> {to} is not a single migration arc for a device with {caps} (the next arc is {from} -> {via})")]
    NotAnArc {
        from: MigState,
        to: MigState,
        via: MigState,
        caps: MigrationCaps,
    },
    /// The device cannot be in `state` at all.
    #[error("{from} -> {to}: {state} is not a state of a device with {caps}")]
    Unsupported {
        from: MigState,
        to: MigState,
        state: MigState,
        caps: MigrationCaps,
    },
    /// No sequence of arcs leads from `from` to `to` (out of ERROR only a reset leads; STOP_COPY
    /// never goes back to pre-copy).
    #[error("{from} -> {to}: no migration arcs lead there{}", if *.from == MigState::Error { " (only VFIO_DEVICE_RESET leaves ERROR)" } else { "" })]
    Blocked { from: MigState, to: MigState },
}

/// `vfio_from_fsm_table`: for `[current][wanted]`, the next state on the way, assuming every
/// optional state exists ([`next_arc`] skips the ones a device lacks). Indexed by uAPI value.
const NEXT: [[MigState; 8]; 8] = {
    use MigState::*;
    //    wanted:  ERROR  STOP        RUNNING     STOP_COPY   RESUMING    RUNNING_P2P PRE_COPY    PRE_COPY_P2P
    [
        /* ERROR */
        [Error, Error, Error, Error, Error, Error, Error, Error],
        /* STOP */
        [
            Error, Stop, RunningP2p, StopCopy, Resuming, RunningP2p, RunningP2p, RunningP2p,
        ],
        /* RUNNING */
        [
            Error, RunningP2p, Running, RunningP2p, RunningP2p, RunningP2p, PreCopy, RunningP2p,
        ],
        /* STOP_COPY */
        [Error, Stop, Stop, StopCopy, Stop, Stop, Error, Error],
        /* RESUMING */
        [Error, Stop, Stop, Stop, Resuming, Stop, Stop, Stop],
        /* RUNNING_P2P */
        [
            Error, Stop, Running, Stop, Stop, RunningP2p, Running, PreCopyP2p,
        ],
        /* PRE_COPY */
        [
            Error, Running, Running, PreCopyP2p, Running, Running, PreCopy, PreCopyP2p,
        ],
        /* PRE_COPY_P2P */
        [
            Error, RunningP2p, RunningP2p, StopCopy, RunningP2p, RunningP2p, PreCopy, PreCopyP2p,
        ],
    ]
};

/// The next state on the way from `from` to `to` for a device with `caps`: the arc the kernel
/// would take first. `from == to` answers `to`.
pub fn next_arc(from: MigState, to: MigState, caps: MigrationCaps) -> Result<MigState, StateError> {
    if from == MigState::Error {
        return Err(StateError::Blocked { from, to });
    }
    for state in [from, to] {
        if !caps.supports(state) {
            return Err(StateError::Unsupported {
                from,
                to,
                state,
                caps,
            });
        }
    }
    let mut next = NEXT[from.index()][to.index()];
    // Skip states the device lacks, as the kernel does. ERROR ends the walk (the kernel's table
    // never leaves ERROR); each skip moves to a supported state or ERROR within two steps, the
    // bound is only a guard.
    for _ in 0..MigState::ALL.len() {
        if next == MigState::Error {
            return Err(StateError::Blocked { from, to });
        }
        if caps.supports(next) {
            return Ok(next);
        }
        next = NEXT[next.index()][to.index()];
    }
    Err(StateError::Blocked { from, to })
}

/// Accepts `from -> to` iff it is one arc of a device with `caps`.
pub fn check_arc(from: MigState, to: MigState, caps: MigrationCaps) -> Result<(), StateError> {
    let via = next_arc(from, to, caps)?;
    if via == to && from != to {
        Ok(())
    } else {
        Err(StateError::NotAnArc {
            from,
            to,
            via,
            caps,
        })
    }
}

/// The states entered, arc by arc, on the way from `from` to `to` (empty when already there).
pub fn path(
    from: MigState,
    to: MigState,
    caps: MigrationCaps,
) -> Result<Vec<MigState>, StateError> {
    let mut states = Vec::new();
    let mut at = from;
    while at != to {
        // The longest path the kernel table produces has 4 arcs; more would be a table bug.
        if states.len() == MigState::ALL.len() {
            return Err(StateError::Blocked { from, to });
        }
        at = next_arc(at, to, caps)?;
        states.push(at);
    }
    Ok(states)
}

#[cfg(test)]
mod tests {
    use super::MigState::*;
    use super::*;

    const BASE: MigrationCaps = MigrationCaps::from_flags(0x1);
    const P2P: MigrationCaps = MigrationCaps::from_flags(0x3);
    const PRE: MigrationCaps = MigrationCaps::from_flags(0x5);
    const ALL: MigrationCaps = MigrationCaps::ALL;

    /// The arcs a driver implements, from the comment above `vfio_from_fsm_table`.
    fn documented_arcs(caps: MigrationCaps) -> Vec<(MigState, MigState)> {
        let mut arcs = vec![
            (Resuming, Stop),
            (Stop, Resuming),
            (Stop, StopCopy),
            (StopCopy, Stop),
        ];
        if caps.p2p {
            arcs.extend([
                (Running, RunningP2p),
                (RunningP2p, Running),
                (RunningP2p, Stop),
                (Stop, RunningP2p),
            ]);
        } else {
            arcs.extend([(Running, Stop), (Stop, Running)]);
        }
        if caps.pre_copy {
            arcs.extend([(Running, PreCopy), (PreCopy, Running)]);
            if caps.p2p {
                arcs.extend([
                    (PreCopy, PreCopyP2p),
                    (PreCopyP2p, PreCopy),
                    (PreCopyP2p, RunningP2p),
                    (PreCopyP2p, StopCopy),
                    (RunningP2p, PreCopyP2p),
                ]);
            } else {
                arcs.push((PreCopy, StopCopy));
            }
        }
        arcs
    }

    #[test]
    fn raw_values_names_and_serde_match_the_uapi() {
        let names = [
            "ERROR",
            "STOP",
            "RUNNING",
            "STOP_COPY",
            "RESUMING",
            "RUNNING_P2P",
            "PRE_COPY",
            "PRE_COPY_P2P",
        ];
        for (raw, state) in MigState::ALL.into_iter().enumerate() {
            assert_eq!(state.raw() as usize, raw);
            assert_eq!(MigState::from_raw(state.raw()), Some(state));
            assert_eq!(state.to_string(), names[raw]);
            let json = serde_json::to_string(&state).expect("serialize");
            assert_eq!(json, format!("\"{}\"", names[raw]));
        }
        assert_eq!(MigState::from_raw(8), None);
    }

    #[test]
    fn every_documented_arc_is_accepted_and_nothing_else() {
        for caps in [BASE, P2P, PRE, ALL] {
            let documented = documented_arcs(caps);
            for from in MigState::ALL {
                for to in MigState::ALL {
                    let accepted = check_arc(from, to, caps).is_ok();
                    assert_eq!(
                        accepted,
                        documented.contains(&(from, to)),
                        "{from} -> {to} with {caps}"
                    );
                }
            }
        }
    }

    #[test]
    fn illegal_arcs_name_both_states() {
        let err = check_arc(Running, StopCopy, ALL).expect_err("two arcs");
        let msg = err.to_string();
        assert!(msg.contains("RUNNING -> STOP_COPY"), "{msg}");
        assert!(msg.contains("RUNNING -> RUNNING_P2P"), "{msg}");

        let err = check_arc(StopCopy, PreCopy, ALL).expect_err("blocked");
        assert_eq!(
            err,
            StateError::Blocked {
                from: StopCopy,
                to: PreCopy
            }
        );
        assert!(err.to_string().contains("STOP_COPY -> PRE_COPY"), "{err}");

        let err = check_arc(Running, PreCopy, P2P).expect_err("no PRE_COPY");
        assert!(err.to_string().contains("RUNNING -> PRE_COPY"), "{err}");
        assert!(err.to_string().contains("STOP_COPY|P2P"), "{err}");

        let err = check_arc(Running, Running, ALL).expect_err("no self arc");
        assert!(err.to_string().contains("RUNNING -> RUNNING"), "{err}");
    }

    #[test]
    fn error_is_neither_left_nor_requested() {
        for s in MigState::ALL {
            assert!(path(Error, s, ALL).is_err() || s == Error);
            let err = path(Running, Error, ALL).expect_err("ERROR is no target");
            assert!(err.to_string().contains("RUNNING -> ERROR"), "{err}");
        }
        let msg = path(Error, Running, ALL)
            .expect_err("reset only")
            .to_string();
        assert!(msg.contains("VFIO_DEVICE_RESET"), "{msg}");
    }

    #[test]
    fn kernel_documented_multi_arc_paths_with_every_capability() {
        // The list above vfio_from_fsm_table ("if all optional features are supported").
        let cases: &[(MigState, &[MigState])] = &[
            (PreCopy, &[PreCopyP2p, StopCopy]),
            (PreCopy, &[Running, RunningP2p]),
            (PreCopy, &[Running, RunningP2p, Stop]),
            (PreCopy, &[Running, RunningP2p, Stop, Resuming]),
            (PreCopyP2p, &[RunningP2p, Running]),
            (PreCopyP2p, &[RunningP2p, Stop]),
            (PreCopyP2p, &[RunningP2p, Stop, Resuming]),
            (Resuming, &[Stop, RunningP2p]),
            (Resuming, &[Stop, RunningP2p, PreCopyP2p]),
            (Resuming, &[Stop, RunningP2p, Running]),
            (Resuming, &[Stop, RunningP2p, Running, PreCopy]),
            (Resuming, &[Stop, StopCopy]),
            (Running, &[RunningP2p, PreCopyP2p]),
            (Running, &[RunningP2p, Stop]),
            (Running, &[RunningP2p, Stop, Resuming]),
            (Running, &[RunningP2p, Stop, StopCopy]),
            (RunningP2p, &[Running, PreCopy]),
            (RunningP2p, &[Stop, Resuming]),
            (RunningP2p, &[Stop, StopCopy]),
            (Stop, &[RunningP2p, PreCopyP2p]),
            (Stop, &[RunningP2p, Running]),
            (Stop, &[RunningP2p, Running, PreCopy]),
            (StopCopy, &[Stop, Resuming]),
            (StopCopy, &[Stop, RunningP2p]),
            (StopCopy, &[Stop, RunningP2p, Running]),
        ];
        for (from, states) in cases {
            let to = *states.last().expect("non-empty");
            assert_eq!(
                path(*from, to, ALL).expect("path"),
                states.to_vec(),
                "{from} -> {to}"
            );
        }
    }

    #[test]
    fn paths_are_made_of_accepted_arcs_and_never_visit_missing_states() {
        for caps in [BASE, P2P, PRE, ALL] {
            for from in MigState::ALL.into_iter().filter(|s| caps.supports(*s)) {
                for to in MigState::ALL.into_iter().filter(|s| caps.supports(*s)) {
                    let blocked = from == StopCopy && to.is_precopy();
                    let Ok(states) = path(from, to, caps) else {
                        assert!(blocked, "no path {from} -> {to} with {caps}");
                        continue;
                    };
                    assert!(!blocked, "{from} -> {to} must be blocked");
                    let mut at = from;
                    for &s in &states {
                        check_arc(at, s, caps).expect("each step is one arc");
                        assert!(caps.supports(s), "{s} visited with {caps}");
                        at = s;
                    }
                    assert_eq!(at, to);
                }
            }
        }
    }

    #[test]
    fn without_p2p_paths_avoid_the_p2p_states() {
        assert_eq!(path(Running, StopCopy, PRE).unwrap(), [Stop, StopCopy]);
        assert_eq!(path(PreCopy, StopCopy, PRE).unwrap(), [StopCopy]);
        assert_eq!(path(StopCopy, Running, BASE).unwrap(), [Stop, Running]);
        assert_eq!(path(Running, Resuming, BASE).unwrap(), [Stop, Resuming]);
        for caps in [BASE, PRE] {
            for from in MigState::ALL {
                for to in MigState::ALL {
                    if let Ok(states) = path(from, to, caps) {
                        assert!(
                            !states.contains(&RunningP2p) && !states.contains(&PreCopyP2p),
                            "{from} -> {to} with {caps}: {states:?}"
                        );
                    }
                }
            }
            let err = path(Running, RunningP2p, caps).expect_err("no P2P");
            assert!(matches!(
                err,
                StateError::Unsupported {
                    state: RunningP2p,
                    ..
                }
            ));
        }
    }

    #[test]
    fn pre_copy_only_with_the_pre_copy_flag() {
        for caps in [BASE, P2P] {
            for from in MigState::ALL {
                for to in MigState::ALL {
                    if let Ok(states) = path(from, to, caps) {
                        assert!(
                            !states.iter().any(|s| s.is_precopy()),
                            "{from} -> {to} with {caps}: {states:?}"
                        );
                    }
                }
            }
            let err = path(Running, PreCopy, caps).expect_err("no PRE_COPY");
            assert_eq!(
                err,
                StateError::Unsupported {
                    from: Running,
                    to: PreCopy,
                    state: PreCopy,
                    caps
                }
            );
        }
        assert_eq!(path(Running, PreCopy, PRE).unwrap(), [PreCopy]);
        assert_eq!(path(Running, PreCopy, ALL).unwrap(), [PreCopy]);
        assert_eq!(
            path(Running, PreCopyP2p, ALL).unwrap(),
            [RunningP2p, PreCopyP2p]
        );
    }

    #[test]
    fn switchover_with_p2p_quiesces_first() {
        // Several devices: all to *_P2P, then each to STOP_COPY.
        assert_eq!(path(PreCopy, PreCopyP2p, ALL).unwrap(), [PreCopyP2p]);
        assert_eq!(path(PreCopyP2p, StopCopy, ALL).unwrap(), [StopCopy]);
        assert_eq!(path(RunningP2p, StopCopy, ALL).unwrap(), [Stop, StopCopy]);
        // Destination: RESUMING -> STOP -> RUNNING_P2P -> RUNNING.
        assert_eq!(
            path(Resuming, Running, ALL).unwrap(),
            [Stop, RunningP2p, Running]
        );
        assert_eq!(path(Running, Running, ALL).unwrap(), []);
    }
}
