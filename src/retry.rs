//! Capped exponential backoff with jitter, for reconnecting to the database
//! and the broker.

use crate::config::RetryConfig;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(cfg: &RetryConfig) -> Backoff {
        Backoff {
            initial: cfg.initial_backoff,
            max: cfg.max_backoff,
            attempt: 0,
        }
    }

    /// The next delay: `initial · 2^attempt`, capped at `max`, then scaled
    /// by a random factor in [0.5, 1) so that sidecars restarted together do
    /// not reconnect in lockstep.
    pub fn next_delay(&mut self) -> Duration {
        let exp = self.initial.saturating_mul(1u32 << self.attempt.min(20));
        self.attempt = self.attempt.saturating_add(1);
        let capped = exp.min(self.max);
        capped.mul_f64(0.5 + rand::random::<f64>() * 0.5)
    }

    /// Back to the first delay, after a session that made progress.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn attempt(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_then_caps_with_jitter() {
        let mut b = Backoff::new(&RetryConfig {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
        });
        let delays: Vec<Duration> = (0..10).map(|_| b.next_delay()).collect();
        for (i, d) in delays.iter().enumerate() {
            let ceiling = Duration::from_millis(100 * (1 << i)).min(Duration::from_secs(2));
            assert!(
                *d <= ceiling && *d >= ceiling / 2,
                "attempt {i}: {d:?} vs {ceiling:?}"
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
