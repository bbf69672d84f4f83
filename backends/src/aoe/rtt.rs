//! The retransmission timeout, adapted to the measured round trip (RFC 6298's SRTT and
//! RTTVAR), clamped: a LAN round trip is microseconds, but a target flushing its page
//! cache can stall for tens of milliseconds, and a timeout below that only duplicates
//! work the target is already doing.

use std::time::Duration;

pub const MIN_RTO: Duration = Duration::from_millis(10);
pub const MAX_RTO: Duration = Duration::from_millis(500);
/// Before any sample.
const INITIAL_RTO: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, Default)]
pub struct Rtt {
    /// Smoothed round trip and its variation, in microseconds; None before a sample.
    srtt_us: Option<f64>,
    rttvar_us: f64,
}

impl Rtt {
    /// Take one round trip of a frame sent once (Karn: never one that was re-sent, whose
    /// reply could answer either transmission).
    pub fn sample(&mut self, rtt: Duration) {
        let r = rtt.as_secs_f64() * 1e6;
        match self.srtt_us {
            None => {
                self.srtt_us = Some(r);
                self.rttvar_us = r / 2.0;
            }
            Some(s) => {
                self.rttvar_us = 0.75 * self.rttvar_us + 0.25 * (s - r).abs();
                self.srtt_us = Some(0.875 * s + 0.125 * r);
            }
        }
    }

    /// The timeout for a first transmission.
    pub fn rto(&self) -> Duration {
        let Some(s) = self.srtt_us else {
            return INITIAL_RTO;
        };
        let us = s + (4.0 * self.rttvar_us).max(1000.0);
        Duration::from_micros(us as u64).clamp(MIN_RTO, MAX_RTO)
    }

    pub fn srtt(&self) -> Option<Duration> {
        self.srtt_us.map(|s| Duration::from_micros(s as u64))
    }
}

/// The timeout for the next transmission of a frame whose last one timed out.
pub fn backoff(rto: Duration) -> Duration {
    (rto * 2).min(MAX_RTO)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapts_to_samples_within_bounds() {
        let mut r = Rtt::default();
        assert_eq!(r.rto(), INITIAL_RTO);
        for _ in 0..50 {
            r.sample(Duration::from_micros(50));
        }
        assert_eq!(r.rto(), MIN_RTO, "a fast LAN is held at the floor");
        for _ in 0..50 {
            r.sample(Duration::from_millis(40));
        }
        let rto = r.rto();
        assert!(rto > Duration::from_millis(40) && rto < MAX_RTO, "{rto:?}");
        r.sample(Duration::from_secs(5));
        assert_eq!(r.rto(), MAX_RTO);
        assert_eq!(backoff(Duration::from_millis(300)), MAX_RTO);
        assert_eq!(backoff(MIN_RTO), MIN_RTO * 2);
    }
}
