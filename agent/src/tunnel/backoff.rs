//! Reconnect backoff: starts at `initial`, multiplies by 1.5 after each failure, caps at `max`
//! (upstream agent: 1 s, ×1.5, 10 s).
use std::time::Duration;

/// Exponential backoff state.
#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max: max.max(initial),
            next: initial,
        }
    }

    /// The delay to wait now; the following one grows by 1.5×.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = self.next.mul_f64(1.5).min(self.max);
        d
    }

    /// Back to the initial delay (after a successful connection).
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_by_half_and_caps() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(10));
        let seq: Vec<u128> = (0..8).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(seq, vec![1000, 1500, 2250, 3375, 5062, 7593, 10000, 10000]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_secs(1));
    }
}
