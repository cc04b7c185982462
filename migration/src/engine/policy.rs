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
