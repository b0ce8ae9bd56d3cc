//! What the whole machine's CPUs did while the writers ran, from /proc/stat: busy, idle, or
//! stolen by the host (a VM's vCPU that was ready to run while the hypervisor ran something
//! else). On a shared VM the steal moves latency figures by whole milliseconds from one hour to
//! the next, so a report carries it beside them. A VM may also take freed memory back
//! (`free_page_reporting_order`), which makes every first touch of new memory slow.

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

/// Where the kernel says which free-block order it reports to the host.
const PAGE_REPORTING_ORDER: &str = "/sys/module/page_reporting/parameters/page_reporting_order";
/// The virtio devices bound to the balloon driver.
const BALLOON_DEVICES: &str = "/sys/bus/virtio/drivers/virtio_balloon";
/// VIRTIO_BALLOON_F_REPORTING, the balloon's feature bit for free page reporting.
const BALLOON_F_REPORTING: usize = 5;
/// The largest free block the page allocator keeps (x86-64's MAX_PAGE_ORDER, 4 MiB): a
/// reporting order above it reports nothing.
const MAX_PAGE_ORDER: u32 = 10;

/// Whether this VM gives freed memory back to its host (virtio-balloon free page reporting),
/// and from which block order (pages of 4 KiB << order): the host takes back each free block
/// that large, so touching that memory again, as every new page of a tmpfs file or the page
/// cache does, first faults on the host. Copies into new memory then run at a fraction of their
/// speed (README, Performance), which moves every figure that writes fresh pages. `None`: no
/// such device, or reporting stopped.
pub fn free_page_reporting_order() -> Option<u32> {
    let features: Vec<String> = std::fs::read_dir(BALLOON_DEVICES)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("virtio"))
        .filter_map(|e| std::fs::read_to_string(e.path().join("features")).ok())
        .collect();
    let order = std::fs::read_to_string(PAGE_REPORTING_ORDER).ok();
    reporting_order(&features, order.as_deref())
}

fn reporting_order(balloon_features: &[String], order: Option<&str>) -> Option<u32> {
    let offered = balloon_features
        .iter()
        .any(|f| f.as_bytes().get(BALLOON_F_REPORTING) == Some(&b'1'));
    let order: u32 = order?.trim().parse().ok()?;
    (offered && order <= MAX_PAGE_ORDER).then_some(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_page_reporting_needs_a_balloon_that_offers_it_and_an_order_a_block_can_have() {
        // virtio's features file: one character per bit, bit 5 is VIRTIO_BALLOON_F_REPORTING.
        let reporting = "0110010100000000000000000000000010000000".to_string();
        let stats_only = "0110000100000000000000000000000010000000".to_string();
        let offered = std::slice::from_ref(&reporting);
        assert_eq!(reporting_order(offered, Some("5\n")), Some(5));
        assert_eq!(
            reporting_order(&[stats_only.clone(), reporting.clone()], Some("9")),
            Some(9)
        );
        assert_eq!(reporting_order(&[stats_only], Some("5")), None);
        assert_eq!(reporting_order(&[], Some("5")), None);
        // No page_reporting module: nothing reports.
        assert_eq!(reporting_order(offered, None), None);
        // An order above the largest free block stops it (how an operator turns it off).
        assert_eq!(reporting_order(offered, Some("11")), None);
        assert_eq!(reporting_order(offered, Some("x")), None);
        assert_eq!(reporting_order(&["01".to_string()], Some("5")), None);
    }

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
