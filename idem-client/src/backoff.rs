//! The backoff arithmetic: exponential growth with full jitter. No I/O, no clock, no policy: the
//! random draw is passed in so the bounds can be tested exactly.

use std::time::Duration;

/// Exponential backoff with full jitter: the wait before retry `n` (0 for the first retry) is
/// drawn uniformly from `[0, min(max, base × 2ⁿ)]`.
///
/// Full jitter spreads the retries of many clients that failed together (a dropped load balancer,
/// a restarted server) over the whole window instead of sending them back in waves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Backoff {
    pub(crate) base: Duration,
    pub(crate) max: Duration,
}

impl Backoff {
    /// The upper bound of the wait before retry `n`: `min(max, base × 2ⁿ)`, without overflow.
    pub(crate) fn ceiling(&self, n: u32) -> Duration {
        let factor = 1u32.checked_shl(n).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// The wait before retry `n` for a uniform draw `unit` in `[0, 1]` (values outside are
    /// clamped).
    pub(crate) fn wait(&self, n: u32, unit: f64) -> Duration {
        let unit = if unit.is_nan() {
            0.0
        } else {
            unit.clamp(0.0, 1.0)
        };
        self.ceiling(n).mul_f64(unit)
    }

    /// The wait before retry `n`, drawn from the thread's random generator.
    pub(crate) fn draw(&self, n: u32) -> Duration {
        self.wait(n, rand::random::<f64>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Backoff = Backoff {
        base: Duration::from_millis(100),
        max: Duration::from_secs(5),
    };

    #[test]
    fn the_ceiling_doubles_up_to_the_max() {
        let ceilings: Vec<u128> = (0..8).map(|n| B.ceiling(n).as_millis()).collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
    }

    #[test]
    fn the_ceiling_never_overflows() {
        for n in [31, 32, 33, 64, 1000, u32::MAX] {
            assert_eq!(B.ceiling(n), B.max, "retry {n}");
        }
        let huge = Backoff {
            base: Duration::MAX,
            max: Duration::MAX,
        };
        assert_eq!(huge.ceiling(40), Duration::MAX);
    }

    #[test]
    fn full_jitter_spans_zero_to_the_ceiling() {
        assert_eq!(B.wait(3, 0.0), Duration::ZERO);
        assert_eq!(B.wait(3, 1.0), Duration::from_millis(800));
        assert_eq!(B.wait(3, 0.5), Duration::from_millis(400));
        assert_eq!(B.wait(3, -1.0), Duration::ZERO);
        assert_eq!(B.wait(3, 7.0), Duration::from_millis(800));
        assert_eq!(B.wait(3, f64::NAN), Duration::ZERO);
    }

    #[test]
    fn draws_stay_within_bounds_and_spread() {
        for n in 0..10 {
            let ceiling = B.ceiling(n);
            let draws: Vec<Duration> = (0..500).map(|_| B.draw(n)).collect();
            assert!(draws.iter().all(|d| *d <= ceiling), "retry {n}");
            // Full jitter, not equal jitter: the lower half of the window is used too.
            assert!(draws.iter().any(|d| *d < ceiling / 2), "retry {n}");
            assert!(draws.iter().any(|d| *d > ceiling / 2), "retry {n}");
        }
    }
}
