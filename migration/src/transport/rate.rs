//! Token-bucket bandwidth cap shared by all connections of one migration.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Limits the aggregate send rate; a rate of 0 means unlimited. The rate can change while a
/// migration runs.
#[derive(Debug)]
pub struct RateLimiter {
    bytes_per_sec: AtomicU64,
    bucket: Mutex<Bucket>,
}

impl RateLimiter {
    /// A limiter at `bytes_per_sec` (0 = unlimited).
    pub fn new(bytes_per_sec: u64) -> Self {
        RateLimiter {
            bytes_per_sec: AtomicU64::new(bytes_per_sec),
            bucket: Mutex::new(Bucket {
                tokens: 0.0,
                last: Instant::now(),
            }),
        }
    }

    /// Current limit in bytes per second (0 = unlimited).
    pub fn rate(&self) -> u64 {
        self.bytes_per_sec.load(Ordering::Relaxed)
    }

    /// Change the limit.
    pub fn set_rate(&self, bytes_per_sec: u64) {
        self.bytes_per_sec.store(bytes_per_sec, Ordering::Relaxed);
    }

    /// How long the caller must wait before sending `bytes`; debits the bucket.
    pub fn reserve(&self, bytes: u64) -> Duration {
        let rate = self.rate();
        if rate == 0 {
            return Duration::ZERO;
        }
        let rate = rate as f64;
        // A poisoned lock only means another sender panicked; the bucket is still usable.
        let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        // Allow a burst of 50 ms worth of data so small frames do not each sleep.
        let burst = rate * 0.05;
        b.tokens = (b.tokens + now.duration_since(b.last).as_secs_f64() * rate).min(burst);
        b.last = now;
        b.tokens -= bytes as f64;
        if b.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-b.tokens / rate)
        }
    }

    /// Block until `bytes` may be sent.
    pub fn throttle(&self, bytes: u64) {
        let d = self.reserve(bytes);
        if !d.is_zero() {
            std::thread::sleep(d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_charges_debt_at_the_configured_rate() {
        let r = RateLimiter::new(1_000_000);
        // 1 MB at 1 MB/s with at most a 50 ms burst: about a second of debt.
        let d = r.reserve(1_000_000);
        assert!(d >= Duration::from_millis(900), "{d:?}");
        assert!(d <= Duration::from_millis(1000), "{d:?}");
        // Debt accumulates across callers.
        let d2 = r.reserve(500_000);
        assert!(d2 >= Duration::from_millis(1400), "{d2:?}");
    }

    #[test]
    fn zero_rate_is_unlimited_and_rate_can_change() {
        let r = RateLimiter::new(0);
        assert_eq!(r.reserve(u64::MAX / 2), Duration::ZERO);
        r.set_rate(100);
        assert!(r.reserve(1000) >= Duration::from_secs(9));
    }
}
