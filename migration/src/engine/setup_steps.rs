//! Where a migration's setup time went, step by step: on the destination from the receive request
//! to its first ack (the source's wait before it may pause), on the source from the send request
//! to that ack. `GET vm.migration` shows them as `setup_steps`.

use std::time::Instant;

use serde::{Deserialize, Serialize};

/// One timed setup step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetupStep {
    /// What the step did, e.g. `"memory slots"`.
    pub name: String,
    /// Its wall time in µs.
    pub us: u64,
}

/// Times consecutive steps: each [`SetupClock::lap`] is the time since the previous lap.
#[derive(Debug)]
pub struct SetupClock {
    steps: Vec<SetupStep>,
    last: Instant,
}

impl SetupClock {
    /// Starts the clock now, with no step recorded.
    pub fn start() -> Self {
        Self {
            steps: Vec::new(),
            last: Instant::now(),
        }
    }

    /// Records the time since the last lap under `name`.
    pub fn lap(&mut self, name: &str) {
        let now = Instant::now();
        let us =
            u64::try_from(now.saturating_duration_since(self.last).as_micros()).unwrap_or(u64::MAX);
        self.last = now;
        self.steps.push(SetupStep {
            name: name.to_owned(),
            us,
        });
    }

    /// Records a lap made of `parts` timed elsewhere (the VMM's own steps): the parts, then what
    /// the lap took beyond them under `rest`, so the list still adds up to the wall time.
    pub fn lap_split(&mut self, parts: Vec<SetupStep>, rest: &str) {
        let now = Instant::now();
        let total =
            u64::try_from(now.saturating_duration_since(self.last).as_micros()).unwrap_or(u64::MAX);
        self.last = now;
        let inside: u64 = parts.iter().map(|p| p.us).sum();
        self.steps.extend(parts);
        if total > inside {
            self.steps.push(SetupStep {
                name: rest.to_owned(),
                us: total - inside,
            });
        }
    }

    /// Adds steps that ran alongside this clock's (they take no part in its laps), first.
    pub fn record_before(&mut self, parts: Vec<SetupStep>) {
        self.steps.splice(0..0, parts);
    }

    /// The steps so far.
    pub fn steps(&self) -> &[SetupStep] {
        &self.steps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(name: &str, us: u64) -> SetupStep {
        SetupStep {
            name: name.into(),
            us,
        }
    }

    #[test]
    fn a_split_lap_keeps_its_parts_and_names_the_rest_and_earlier_steps_go_first() {
        let mut c = SetupClock::start();
        c.lap_split(vec![step("a", 1_000_000), step("b", 2)], "other");
        // Parts that claim more than the lap's wall time: no negative rest.
        assert_eq!(c.steps(), &[step("a", 1_000_000), step("b", 2)]);
        std::thread::sleep(std::time::Duration::from_millis(2));
        c.lap_split(Vec::new(), "other");
        assert_eq!(c.steps()[2].name, "other");
        assert!(c.steps()[2].us >= 2000, "{:?}", c.steps());
        c.record_before(vec![step("prebuilt", 7)]);
        assert_eq!(c.steps()[0], step("prebuilt", 7));
        assert_eq!(c.steps().len(), 4);
    }
}
