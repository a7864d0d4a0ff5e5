//! Per-key request rate limiting: a token bucket for each API key.
//!
//! Every authenticated `/api/v1` request takes one token from its key's
//! bucket; the bucket refills at `api.rate_limit_per_sec` tokens a second up
//! to `api.rate_limit_burst`. An empty bucket answers 429 with
//! `Retry-After`. A rate of 0 turns the limit off.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use uuid::Uuid;

/// Buckets older than this without a request are forgotten.
const IDLE: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The limiter shared by every request of one api process.
#[derive(Debug)]
pub struct RateLimiter {
    per_sec: f64,
    burst: f64,
    buckets: Mutex<HashMap<Uuid, Bucket>>,
}

impl RateLimiter {
    /// `per_sec` tokens a second, at most `burst` saved; 0 disables it.
    pub fn new(per_sec: u32, burst: u32) -> Self {
        Self {
            per_sec: f64::from(per_sec),
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token for `key`; on an empty bucket, how long until one is
    /// there.
    pub fn check(&self, key: Uuid) -> Result<(), Duration> {
        self.check_at(key, Instant::now())
    }

    fn check_at(&self, key: Uuid, now: Instant) -> Result<(), Duration> {
        if self.per_sec <= 0.0 {
            return Ok(());
        }
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if buckets.len() > 10_000 {
            buckets.retain(|_, b| now.duration_since(b.at) < IDLE);
        }
        let bucket = buckets.entry(key).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let elapsed = now.duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.per_sec).min(self.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - bucket.tokens) / self.per_sec,
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_empties_then_refills() {
        let limiter = RateLimiter::new(10, 3);
        let key = Uuid::now_v7();
        let other = Uuid::now_v7();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(limiter.check_at(key, t0).is_ok());
        }
        let wait = limiter.check_at(key, t0).expect_err("burst spent");
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(100),
            "{wait:?}"
        );
        // Another key has its own bucket.
        assert!(limiter.check_at(other, t0).is_ok());
        // A tenth of a second later one token is back.
        let t1 = t0 + Duration::from_millis(100);
        assert!(limiter.check_at(key, t1).is_ok());
        assert!(limiter.check_at(key, t1).is_err());
    }

    #[test]
    fn zero_rate_disables_the_limit() {
        let limiter = RateLimiter::new(0, 0);
        let key = Uuid::now_v7();
        for _ in 0..10_000 {
            assert!(limiter.check(key).is_ok());
        }
    }
}
