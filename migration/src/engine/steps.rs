//! The switchover's steps, timed where they happen, so `GET vm.migration` can say where a
//! downtime went on each side (the engine's own steps and the VMM's, e.g. one KVM ioctl group).

use std::time::Instant;

use serde::{Deserialize, Serialize};

/// One timed step of a switchover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchoverStep {
    /// What the step did, e.g. `"vCPU sregs"` or `"wait for commit"`.
    pub name: String,
    /// Its wall time in µs (summed over every time it ran, e.g. once per vCPU).
    pub us: u64,
}

/// Times consecutive steps: each [`StepTimes::lap`] is the time since the previous lap (or the
/// start). A name timed again adds to its first entry, so a per-vCPU step is one entry however
/// many vCPUs there are, in the order the steps first ran.
#[derive(Debug)]
pub struct StepTimes {
    steps: Vec<SwitchoverStep>,
    last: Instant,
}

impl Default for StepTimes {
    fn default() -> Self {
        Self::start()
    }
}

fn micros(from: Instant, to: Instant) -> u64 {
    u64::try_from(to.saturating_duration_since(from).as_micros()).unwrap_or(u64::MAX)
}

impl StepTimes {
    /// Starts the clock now, with no step recorded.
    pub fn start() -> Self {
        Self {
            steps: Vec::new(),
            last: Instant::now(),
        }
    }

    /// Restarts the clock without recording the time since the last lap (what came between is
    /// not a step of this list).
    pub fn restart(&mut self) {
        self.last = Instant::now();
    }

    /// Records the time since the last lap under `name`; returns it (µs).
    pub fn lap(&mut self, name: &str) -> u64 {
        let now = Instant::now();
        let us = micros(self.last, now);
        self.last = now;
        self.add(name, us);
        us
    }

    /// Records a lap made of `parts` timed elsewhere (a VMM's own steps): the parts, then what
    /// the lap took beyond them under `rest`, so the list still adds up to the wall time.
    pub fn lap_split(&mut self, parts: Vec<SwitchoverStep>, rest: &str) {
        let now = Instant::now();
        let total = micros(self.last, now);
        self.last = now;
        let inside: u64 = parts.iter().map(|p| p.us).sum();
        for p in parts {
            self.add(&p.name, p.us);
        }
        if total > inside {
            self.add(rest, total - inside);
        }
    }

    fn add(&mut self, name: &str, us: u64) {
        match self.steps.iter_mut().find(|s| s.name == name) {
            Some(s) => s.us = s.us.saturating_add(us),
            None => self.steps.push(SwitchoverStep {
                name: name.to_owned(),
                us,
            }),
        }
    }

    /// The steps so far; the list is empty afterwards (the clock keeps running).
    pub fn take(&mut self) -> Vec<SwitchoverStep> {
        std::mem::take(&mut self.steps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(name: &str, us: u64) -> SwitchoverStep {
        SwitchoverStep {
            name: name.into(),
            us,
        }
    }

    #[test]
    fn a_step_timed_twice_is_one_entry_in_first_run_order() {
        let mut t = StepTimes::start();
        t.add("regs", 3);
        t.add("sregs", 5);
        t.add("regs", 4);
        assert_eq!(t.take(), vec![step("regs", 7), step("sregs", 5)]);
        assert!(t.take().is_empty());
    }

    #[test]
    fn a_split_lap_keeps_its_parts_and_names_the_rest() {
        let mut t = StepTimes::start();
        // Parts that claim more than the lap's wall time: no negative rest, parts kept.
        t.lap_split(vec![step("a", 1_000_000), step("b", 2)], "other");
        assert_eq!(t.take(), vec![step("a", 1_000_000), step("b", 2)]);
        // Parts that claim nothing: the whole lap is the rest.
        std::thread::sleep(std::time::Duration::from_millis(2));
        t.lap_split(Vec::new(), "other");
        let steps = t.take();
        assert_eq!(steps.len(), 1);
        assert_eq!(steps[0].name, "other");
        assert!(steps[0].us >= 2000, "{steps:?}");
    }
}
