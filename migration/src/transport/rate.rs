//! Token-bucket bandwidth cap shared by all connections of one migration.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The bucket's depth in seconds of the rate.
const BURST_SECS: f64 = 0.05;

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

    /// Bytes that may go now without waiting: the burst the bucket has saved up (0 when it is
    /// in debt or there is no cap). A switchover's first bytes up to this go at the link's rate;
    /// the downtime estimate counts on it (`policy::switchover_ms`).
    pub fn available(&self) -> u64 {
        let rate = self.rate();
        if rate == 0 {
            return 0;
        }
        let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        Self::refill(&mut b, rate as f64, Instant::now());
        b.tokens.max(0.0) as u64
    }

    /// Credit the time since the last look at `rate`, up to the burst: 50 ms worth of data, so
    /// small frames do not each sleep.
    fn refill(b: &mut Bucket, rate: f64, now: Instant) {
        let burst = rate * BURST_SECS;
        b.tokens =
            (b.tokens + now.saturating_duration_since(b.last).as_secs_f64() * rate).min(burst);
        b.last = now;
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
        Self::refill(&mut b, rate, Instant::now());
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
    fn available_is_the_saved_burst_and_nothing_in_debt() {
        let r = RateLimiter::new(1_000_000);
        std::thread::sleep(Duration::from_millis(60));
        // Refilled to the 50 ms burst at most, however long it idled.
        assert_eq!(r.available(), 50_000);
        r.reserve(80_000);
        assert_eq!(r.available(), 0, "in debt");
        assert_eq!(RateLimiter::new(0).available(), 0, "no cap, no bucket");
    }

    #[test]
    fn zero_rate_is_unlimited_and_rate_can_change() {
        let r = RateLimiter::new(0);
        assert_eq!(r.reserve(u64::MAX / 2), Duration::ZERO);
        r.set_rate(100);
        assert!(r.reserve(1000) >= Duration::from_secs(9));
    }
}
