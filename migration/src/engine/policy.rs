//! Convergence and auto-converge decisions, pure so they can be tested exhaustively.

use std::time::Duration;

use super::params::TimeoutStrategy;

/// Expected downtime in ms for sending `remaining_bytes` plus `state_bytes` at
/// `bandwidth_bytes_per_sec`. An unknown (zero) bandwidth means "cannot tell": u64::MAX.
pub fn expected_downtime_ms(
    remaining_bytes: u64,
    state_bytes: u64,
    bandwidth_bytes_per_sec: u64,
) -> u64 {
    let bytes = remaining_bytes.saturating_add(state_bytes);
    if bytes == 0 {
        return 0;
    }
    if bandwidth_bytes_per_sec == 0 {
        return u64::MAX;
    }
    let ms = u128::from(bytes) * 1000 / u128::from(bandwidth_bytes_per_sec);
    u64::try_from(ms).unwrap_or(u64::MAX)
}

/// What a switchover started now would put on the wire, by how the transport paces it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SwitchoverLoad {
    /// Guest memory the switchover sends: what is still queued on the lanes (it goes first), the
    /// plan's dirty pages and the pages dirtied between the plan and the pause. Memory frames
    /// are paced by the bandwidth cap, in pre-copy and in the switchover alike.
    pub memory_bytes: u64,
    /// VM, vCPU and device state and device data: control frames, never paced by the cap.
    pub state_bytes: u64,
    /// What the cap's token bucket has saved up: the first memory bytes up to this go at the
    /// link's rate, not the cap's (0 without a cap, or when it is in debt).
    pub burst_bytes: u64,
}

/// The rate guest memory moves at: the link's measured rate under the cap (0 = neither known).
/// The cap paces memory in the switchover too, so this is the rate the estimate uses.
pub fn memory_rate(link_bytes_per_sec: u64, cap_bytes_per_sec: u64) -> u64 {
    match (link_bytes_per_sec, cap_bytes_per_sec) {
        (0, cap) => cap,
        (link, 0) => link,
        (link, cap) => link.min(cap),
    }
}

/// Expected downtime in ms of a switchover sending `load` when the link moves
/// `link_bytes_per_sec` (measured; 0 = not measured yet) and the cap allows `cap_bytes_per_sec`
/// (0 = no cap). Memory goes at the slower of the two — the cap stays in force during the
/// switchover (see docs/architecture.md, "Downtime estimate") — except the bucket's saved-up
/// burst, which goes at the link's rate like the state.
/// Without a measured link the cap is the only rate known: state is charged at it too (an
/// upper bound); with neither, the answer is "cannot tell": u64::MAX.
pub fn switchover_ms(load: SwitchoverLoad, link_bytes_per_sec: u64, cap_bytes_per_sec: u64) -> u64 {
    let memory_rate = memory_rate(link_bytes_per_sec, cap_bytes_per_sec);
    let state_rate = if link_bytes_per_sec == 0 {
        cap_bytes_per_sec
    } else {
        link_bytes_per_sec
    };
    // In ns, each part rounded up: an estimate that decides a promise must not round a part
    // away.
    let ns = |bytes: u64, rate: u64| -> Option<u128> {
        match (bytes, rate) {
            (0, _) => Some(0),
            (_, 0) => None,
            (b, r) => Some((u128::from(b) * 1_000_000_000).div_ceil(u128::from(r))),
        }
    };
    let burst = load.burst_bytes.min(load.memory_bytes);
    match (
        ns(load.memory_bytes - burst, memory_rate),
        ns(burst, state_rate),
        ns(load.state_bytes, state_rate),
    ) {
        (Some(m), Some(b), Some(s)) => {
            u64::try_from((m + b + s).div_ceil(1_000_000)).unwrap_or(u64::MAX)
        }
        _ => u64::MAX,
    }
}

/// What the pre-copy loop does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Another iteration.
    Iterate,
    /// Pause and finish.
    Switchover,
    /// Give up (timeout with the cancel strategy).
    TimedOut,
}

/// Decide after planning an iteration. With nothing left to send, another iteration cannot
/// lower the estimate (the state part is fixed), so switch over.
pub fn decide(
    remaining_bytes: u64,
    expected_ms: u64,
    downtime_ms: u64,
    elapsed: Duration,
    timeout: Duration,
    strategy: TimeoutStrategy,
) -> Decision {
    if remaining_bytes == 0 || expected_ms <= downtime_ms {
        Decision::Switchover
    } else if elapsed >= timeout {
        match strategy {
            TimeoutStrategy::Cancel => Decision::TimedOut,
            TimeoutStrategy::Ignore => Decision::Switchover,
        }
    } else {
        Decision::Iterate
    }
}

/// QEMU-style auto-converge: when the guest dirtied more than half of what the link moved in an
/// iteration, twice in a row, throttle harder: 20 %, then +10 % per step, at most 99 %.
#[derive(Debug, Clone, Default)]
pub struct AutoConverge {
    percent: u8,
    strikes: u8,
}

/// First throttle step.
pub const THROTTLE_INITIAL: u8 = 20;
/// Increment per further step.
pub const THROTTLE_STEP: u8 = 10;
/// Ceiling.
pub const THROTTLE_MAX: u8 = 99;

impl AutoConverge {
    /// Current throttle.
    pub fn percent(&self) -> u8 {
        self.percent
    }

    /// Feed one iteration's numbers; returns the new throttle when it changes.
    pub fn update(&mut self, dirtied_bytes: u64, sent_bytes: u64) -> Option<u8> {
        if dirtied_bytes.saturating_mul(2) <= sent_bytes {
            self.strikes = 0;
            return None;
        }
        self.strikes += 1;
        if self.strikes < 2 {
            return None;
        }
        self.strikes = 0;
        let next = if self.percent == 0 {
            THROTTLE_INITIAL
        } else {
            self.percent.saturating_add(THROTTLE_STEP).min(THROTTLE_MAX)
        };
        (next != self.percent).then(|| {
            self.percent = next;
            next
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_downtime_math() {
        assert_eq!(expected_downtime_ms(0, 0, 0), 0);
        assert_eq!(expected_downtime_ms(1, 0, 0), u64::MAX);
        assert_eq!(expected_downtime_ms(1_000_000, 0, 1_000_000), 1000);
        assert_eq!(expected_downtime_ms(500_000, 500_000, 10_000_000), 100);
        assert_eq!(expected_downtime_ms(u64::MAX, u64::MAX, 1), u64::MAX);
    }

    #[test]
    fn switchover_ms_paces_memory_at_the_cap_and_state_at_the_link() {
        let load = SwitchoverLoad {
            memory_bytes: 1_000_000,
            state_bytes: 100_000,
            burst_bytes: 0,
        };
        // 1 MB/s cap on a 100 MB/s link: memory takes 1 s at the cap, state 1 ms at the link.
        assert_eq!(switchover_ms(load, 100_000_000, 1_000_000), 1001);
        // A cap above the link's rate does not speed anything up.
        assert_eq!(switchover_ms(load, 10_000_000, 1_000_000_000), 110);
        // No cap: all at the link's rate.
        assert_eq!(switchover_ms(load, 100_000_000, 0), 11);
        // Link not measured yet: the cap is the only known rate, for state too.
        assert_eq!(switchover_ms(load, 0, 1_000_000), 1100);
        assert_eq!(switchover_ms(load, 0, 0), u64::MAX);
        assert_eq!(switchover_ms(SwitchoverLoad::default(), 0, 0), 0);
        // Rounded up, never away.
        // The bucket's saved burst goes at the link's rate: 500 kB of the 1 MB skip the cap.
        let burst = SwitchoverLoad {
            burst_bytes: 500_000,
            ..load
        };
        assert_eq!(switchover_ms(burst, 100_000_000, 1_000_000), 506);
        let all = SwitchoverLoad {
            burst_bytes: u64::MAX,
            ..load
        };
        assert_eq!(switchover_ms(all, 100_000_000, 1_000_000), 11);
        let one = SwitchoverLoad {
            memory_bytes: 1,
            state_bytes: 0,
            burst_bytes: 0,
        };
        assert_eq!(switchover_ms(one, 1_000_000_000, 0), 1);
        let huge = SwitchoverLoad {
            memory_bytes: u64::MAX,
            state_bytes: u64::MAX,
            burst_bytes: 0,
        };
        assert_eq!(switchover_ms(huge, 1, 1), u64::MAX);
    }

    #[test]
    fn decide_covers_every_branch() {
        let s = Duration::from_secs;
        use TimeoutStrategy::*;
        assert_eq!(
            decide(1, 300, 300, s(0), s(10), Cancel),
            Decision::Switchover
        );
        assert_eq!(decide(1, 301, 300, s(0), s(10), Cancel), Decision::Iterate);
        assert_eq!(
            decide(1, 301, 300, s(10), s(10), Cancel),
            Decision::TimedOut
        );
        assert_eq!(
            decide(1, 301, 300, s(10), s(10), Ignore),
            Decision::Switchover
        );
        assert_eq!(
            decide(1, 0, 300, s(99), s(10), Cancel),
            Decision::Switchover
        );
        // Nothing dirty but a slow link: the state estimate alone exceeds the limit. Iterating
        // cannot help, so switch over instead of spinning until the timeout.
        assert_eq!(
            decide(0, 900, 300, s(0), s(10), Cancel),
            Decision::Switchover
        );
    }

    #[test]
    fn auto_converge_steps_after_two_strikes_and_caps() {
        let mut a = AutoConverge::default();
        assert_eq!(a.update(100, 100), None, "first strike");
        assert_eq!(a.update(100, 100), Some(20));
        assert_eq!(a.update(10, 100), None, "converging resets strikes");
        assert_eq!(a.update(100, 100), None);
        assert_eq!(a.update(100, 100), Some(30));
        for _ in 0..30 {
            a.update(100, 100);
        }
        assert_eq!(a.percent(), THROTTLE_MAX);
        assert_eq!(a.update(100, 100), None);
        assert_eq!(a.update(100, 100), None, "no change at the ceiling");
    }
}
