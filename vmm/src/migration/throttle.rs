//! Auto-converge: keep the vCPUs paused a given share of each period so the guest dirties memory
//! more slowly than the link drains it.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::machine::Machine;

/// Length of one run/pause cycle.
const PERIOD: Duration = Duration::from_millis(50);

/// A background thread pausing the machine `percent`% of the time.
#[derive(Debug)]
pub struct Throttle {
    percent: Arc<AtomicU8>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Throttle {
    /// An idle throttle for `machine`.
    pub fn new(machine: Arc<Machine>) -> std::io::Result<Self> {
        let percent = Arc::new(AtomicU8::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (percent.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("tern-throttle".into())
            .spawn(move || {
                crate::seccomp::install_or_log(crate::seccomp::ThreadKind::Device);
                while !s.load(Ordering::Acquire) {
                    let pct = u32::from(p.load(Ordering::Acquire).min(99));
                    if pct == 0 {
                        std::thread::sleep(PERIOD);
                        continue;
                    }
                    std::thread::sleep(PERIOD * (100 - pct) / 100);
                    machine.pause();
                    std::thread::sleep(PERIOD * pct / 100);
                    machine.resume();
                }
            })?;
        Ok(Self {
            percent,
            stop,
            thread: Some(thread),
        })
    }

    /// Sets the paused share (0 = off, at most 99).
    pub fn set(&self, percent: u8) {
        self.percent.store(percent.min(99), Ordering::Release);
    }

    /// Stops throttling and waits until the machine is no longer touched by the throttle thread
    /// (it ends with the vCPUs resumed).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.stop();
    }
}
