//! Fault latencies: power-of-two µs buckets, plus exact percentiles from
//! the samples (kept up to a cap).

use super::LATENCY_BUCKETS;

/// Most samples kept for exact percentiles (8 MiB of `u64`s).
const MAX_SAMPLES: usize = 1 << 20;

/// Latencies of remote faults, in µs.
#[derive(Clone, Debug, Default)]
pub struct LatencyHistogram {
    buckets: [u64; LATENCY_BUCKETS],
    samples: Vec<u64>,
    count: u64,
    sum: u64,
}

impl LatencyHistogram {
    /// Bucket of a latency: `[2^i, 2^(i+1))` µs is bucket i; 0 µs is
    /// bucket 0; the last bucket takes everything longer.
    pub fn bucket(us: u64) -> usize {
        if us == 0 {
            0
        } else {
            (63 - us.leading_zeros() as usize).min(LATENCY_BUCKETS - 1)
        }
    }

    /// Adds one latency.
    pub fn record(&mut self, us: u64) {
        self.buckets[Self::bucket(us)] += 1;
        self.count += 1;
        self.sum = self.sum.saturating_add(us);
        if self.samples.len() < MAX_SAMPLES {
            self.samples.push(us);
        }
    }

    /// Latencies recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Sum of all latencies, µs.
    pub fn sum(&self) -> u64 {
        self.sum
    }

    /// Counts per bucket, without the empty tail.
    pub fn buckets(&self) -> Vec<u64> {
        let n = self
            .buckets
            .iter()
            .rposition(|&c| c > 0)
            .map_or(0, |i| i + 1);
        self.buckets[..n].to_vec()
    }

    /// The `q` quantile (0..=1) of the samples, µs; 0 without samples.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.samples.is_empty() {
            return 0;
        }
        let mut s = self.samples.clone();
        s.sort_unstable();
        let i = ((s.len() as f64 - 1.0) * q.clamp(0.0, 1.0)).round() as usize;
        s[i]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_powers_of_two() {
        assert_eq!(LatencyHistogram::bucket(0), 0);
        assert_eq!(LatencyHistogram::bucket(1), 0);
        assert_eq!(LatencyHistogram::bucket(2), 1);
        assert_eq!(LatencyHistogram::bucket(3), 1);
        assert_eq!(LatencyHistogram::bucket(1024), 10);
        assert_eq!(LatencyHistogram::bucket(u64::MAX), LATENCY_BUCKETS - 1);
        let mut h = LatencyHistogram::default();
        for us in [1, 100, 100, 100, 5000] {
            h.record(us);
        }
        assert_eq!(h.count(), 5);
        assert_eq!(h.sum(), 5301);
        let b = h.buckets();
        assert_eq!(b.len(), 13);
        assert_eq!((b[0], b[6], b[12]), (1, 3, 1));
        assert_eq!(h.quantile(0.5), 100);
        assert_eq!(h.quantile(0.99), 5000);
        assert_eq!(LatencyHistogram::default().quantile(0.5), 0);
    }
}
