//! What the whole machine's CPUs did while the writers ran, from /proc/stat: busy, idle, or
//! stolen by the host (a VM's vCPU that was ready to run while the hypervisor ran something
//! else). On a shared VM the steal moves latency figures by whole milliseconds from one hour to
//! the next, so a report carries it beside them.

/// Jiffies summed over all CPUs, read from the `cpu` line of /proc/stat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTimes {
    busy: u64,
    idle: u64,
    steal: u64,
}

/// The run's share of CPU time in each state, in percent of all CPUs' time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpuSplit {
    pub busy_percent: f64,
    pub idle_percent: f64,
    pub steal_percent: f64,
}

impl CpuTimes {
    /// The machine's times now; `None` where /proc/stat is missing or unreadable.
    pub fn now() -> Option<CpuTimes> {
        CpuTimes::parse(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    /// From /proc/stat's text: `cpu  user nice system idle iowait irq softirq steal guest
    /// guest_nice`. Guest time is already counted in user and nice; a kernel too old to report
    /// steal reports none.
    fn parse(stat: &str) -> Option<CpuTimes> {
        let line = stat.lines().find(|l| l.starts_with("cpu "))?;
        let jiffies: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|v| v.parse().ok())
            .collect::<Option<_>>()?;
        let field = |i: usize| jiffies.get(i).copied().unwrap_or(0);
        if jiffies.len() < 4 {
            return None;
        }
        Some(CpuTimes {
            busy: field(0) + field(1) + field(2) + field(5) + field(6),
            idle: field(3) + field(4),
            steal: field(7),
        })
    }

    /// How the time between `self` and `later` split; `None` if no time passed.
    pub fn split_until(self, later: CpuTimes) -> Option<CpuSplit> {
        let busy = later.busy.saturating_sub(self.busy) as f64;
        let idle = later.idle.saturating_sub(self.idle) as f64;
        let steal = later.steal.saturating_sub(self.steal) as f64;
        let total = busy + idle + steal;
        if total == 0.0 {
            return None;
        }
        Some(CpuSplit {
            busy_percent: 100.0 * busy / total,
            idle_percent: 100.0 * idle / total,
            steal_percent: 100.0 * steal / total,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_split_counts_irq_time_as_busy_iowait_as_idle_and_leaves_guest_time_out() {
        let before = CpuTimes::parse("cpu  100 0 100 100 0 0 0 0 0 0\ncpu0 1 2 3 4\n").unwrap();
        // +40 user, +10 nice, +20 system, +15 idle, +5 iowait, +2 irq, +3 softirq, +5 steal,
        // +40 guest (inside user already).
        let after = CpuTimes::parse("cpu  140 10 120 115 5 2 3 5 40 0\n").unwrap();
        let split = before.split_until(after).unwrap();
        assert_eq!(split.busy_percent, 75.0);
        assert_eq!(split.idle_percent, 20.0);
        assert_eq!(split.steal_percent, 5.0);
    }

    #[test]
    fn an_old_kernel_without_steal_reports_none_and_garbage_is_refused() {
        let before = CpuTimes::parse("cpu 10 0 10 80\n").unwrap();
        let after = CpuTimes::parse("cpu 20 0 20 100\n").unwrap();
        assert_eq!(before.split_until(after).unwrap().steal_percent, 0.0);
        assert_eq!(before.split_until(before), None);
        assert_eq!(CpuTimes::parse("cpu0 1 2 3 4\n"), None);
        assert_eq!(CpuTimes::parse("cpu  1 x 3 4\n"), None);
        assert_eq!(CpuTimes::parse("cpu  1 2 3\n"), None);
    }
}
