//! Latency samples and their percentiles; process figures from `/proc`.

use std::collections::BTreeMap;

use serde_json::{Value, json};

/// What a load phase saw: latencies of the calls that started and finished
/// inside the measuring window, and the failures by gRPC code.
#[derive(Default)]
pub struct Sample {
    pub latencies_ns: Vec<u64>,
    pub errors: BTreeMap<String, u64>,
    /// Length of the measuring window, in seconds.
    pub window: f64,
}

impl Sample {
    pub fn ok(&self) -> u64 {
        self.latencies_ns.len() as u64
    }

    pub fn failures(&self) -> u64 {
        self.errors.values().sum()
    }

    pub fn rps(&self) -> f64 {
        if self.window > 0.0 {
            self.ok() as f64 / self.window
        } else {
            0.0
        }
    }

    pub fn merge(&mut self, other: Sample) {
        self.latencies_ns.extend(other.latencies_ns);
        for (code, n) in other.errors {
            *self.errors.entry(code).or_default() += n;
        }
        self.window = self.window.max(other.window);
    }

    pub fn summary(&self) -> Summary {
        Summary::of(&self.latencies_ns)
    }
}

/// Percentiles in milliseconds (nearest rank).
#[derive(Clone, Copy, Debug, Default)]
pub struct Summary {
    pub n: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Summary {
    pub fn of(latencies_ns: &[u64]) -> Summary {
        if latencies_ns.is_empty() {
            return Summary::default();
        }
        let mut sorted = latencies_ns.to_vec();
        sorted.sort_unstable();
        let at = |q: f64| {
            // Nearest rank: the smallest value with at least q of the samples at or below it.
            let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
            sorted[rank - 1] as f64 / 1e6
        };
        Summary {
            n: sorted.len(),
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            max: at(1.0),
        }
    }

    /// `p50 / p90 / p99 / max` in ms, for the tables.
    pub fn cells(&self) -> String {
        format!(
            "{:.3} / {:.3} / {:.3} / {:.3}",
            self.p50, self.p90, self.p99, self.max
        )
    }

    pub fn json(&self) -> Value {
        json!({"n": self.n, "p50_ms": r3(self.p50), "p90_ms": r3(self.p90),
               "p99_ms": r3(self.p99), "max_ms": r3(self.max)})
    }
}

/// Rounded to 3 decimals, for the JSON line.
pub fn r3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// `VmHWM` (peak) and `VmRSS` (current) of `pid`, in KiB.
pub fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// User + system CPU time `pid` has used so far, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after ')'.
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 / hz
}

/// The 1-minute load average.
pub fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(-1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let ns: Vec<u64> = (1..=100).map(|ms| ms * 1_000_000).collect();
        let s = Summary::of(&ns);
        assert_eq!(
            (s.n, s.p50, s.p90, s.p99, s.max),
            (100, 50.0, 90.0, 99.0, 100.0)
        );
        let one = Summary::of(&[2_500_000]);
        assert_eq!((one.p50, one.p99, one.max), (2.5, 2.5, 2.5));
        assert_eq!(Summary::of(&[]).n, 0);
    }

    #[test]
    fn own_process_figures_are_read() {
        let (hwm, rss) = rss_kib(std::process::id());
        assert!(hwm >= rss && rss > 0);
        assert!(cpu_seconds(std::process::id()) >= 0.0);
    }
}
