//! Where a migration's setup and switchover time went, step by step, timed where it happens (the
//! engine's own steps and the VMM's, e.g. one KVM ioctl group), so `GET vm.migration` can show
//! `setup_steps` and `switchover_steps` on each side.

use std::time::Instant;

use serde::{Deserialize, Serialize};

/// One timed step of a setup or a switchover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimedStep {
    /// What the step did, e.g. `"memory slots"` or `"vCPU sregs"`.
    pub name: String,
    /// Its wall time in µs (for a switchover, summed over every time it ran, e.g. per vCPU).
    pub us: u64,
}

/// Times consecutive steps: each [`StepTimes::lap`] is the time since the previous lap (or the
/// start). A switchover's clock ([`StepTimes::start`]) adds a name timed again to its first entry,
/// so a per-vCPU step is one entry however many vCPUs there are, in the order the steps first
/// ran; a setup's ([`StepTimes::sequence`]) keeps every lap as its own entry.
#[derive(Debug)]
pub struct StepTimes {
    steps: Vec<TimedStep>,
    last: Instant,
    merge_repeats: bool,
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
    /// A switchover's clock, started now: a step timed again adds to its first entry.
    pub fn start() -> Self {
        Self {
            steps: Vec::new(),
            last: Instant::now(),
            merge_repeats: true,
        }
    }

    /// A setup's clock, started now: every lap is an entry of its own, in order.
    pub fn sequence() -> Self {
        Self {
            merge_repeats: false,
            ..Self::start()
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
    pub fn lap_split(&mut self, parts: Vec<TimedStep>, rest: &str) {
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

    /// Appends steps timed elsewhere that ran since the last lap (a builder's own steps); the
    /// clock keeps running, so [`StepTimes::restart`] once they are all in.
    pub fn extend(&mut self, parts: &[TimedStep]) {
        for p in parts {
            self.add(&p.name, p.us);
        }
    }

    /// Adds steps that ran alongside this clock's (they take no part in its laps), first.
    pub fn record_before(&mut self, parts: Vec<TimedStep>) {
        self.steps.splice(0..0, parts);
    }

    fn add(&mut self, name: &str, us: u64) {
        match self
            .steps
            .iter_mut()
            .find(|s| self.merge_repeats && s.name == name)
        {
            Some(s) => s.us = s.us.saturating_add(us),
            None => self.steps.push(TimedStep {
                name: name.to_owned(),
                us,
            }),
        }
    }

    /// The steps so far.
    pub fn steps(&self) -> &[TimedStep] {
        &self.steps
    }

    /// The steps so far; the list is empty afterwards (the clock keeps running).
    pub fn take(&mut self) -> Vec<TimedStep> {
        std::mem::take(&mut self.steps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(name: &str, us: u64) -> TimedStep {
        TimedStep {
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
    fn a_sequence_keeps_a_step_timed_twice_as_two_entries() {
        let mut t = StepTimes::sequence();
        t.add("memory fd received", 3);
        t.add("memory fd received", 4);
        assert_eq!(
            t.take(),
            vec![step("memory fd received", 3), step("memory fd received", 4)]
        );
    }

    #[test]
    fn extended_steps_follow_in_order_and_a_restart_drops_their_time_from_the_next_lap() {
        let mut t = StepTimes::sequence();
        t.add("config", 2);
        t.extend(&[step("memory slots", 5), step("vCPUs", 7)]);
        std::thread::sleep(std::time::Duration::from_millis(20));
        t.restart();
        let us = t.lap("check the devices");
        assert!(
            us < 20_000,
            "the restart dropped the 20 ms before it: {us} µs"
        );
        let names: Vec<String> = t.take().into_iter().map(|s| s.name).collect();
        assert_eq!(
            names,
            ["config", "memory slots", "vCPUs", "check the devices"]
        );
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

    #[test]
    fn steps_that_ran_alongside_go_first() {
        let mut t = StepTimes::sequence();
        t.lap("own");
        t.record_before(vec![step("prebuilt", 7)]);
        assert_eq!(t.steps()[0], step("prebuilt", 7));
        assert_eq!(t.steps()[1].name, "own");
        assert_eq!(t.steps().len(), 2);
    }
}
