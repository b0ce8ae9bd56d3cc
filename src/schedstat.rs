//! What the kernel counts of a thread's time: on a CPU, and runnable but waiting for one
//! (`/proc/PID/task/TID/schedstat`, kept by kernels built with CONFIG_SCHED_INFO). On a machine
//! short of CPUs a thread's wait is where latency goes that no profile of its own code shows:
//! the leader reports its server thread's (`Leader::server_thread_times`), and loadgen every
//! process's.

use std::time::Duration;

/// A thread's time so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThreadTimes {
    pub on_cpu: Duration,
    /// Runnable, not running: waiting in a run queue for a CPU.
    pub waiting: Duration,
}

/// From a schedstat line, `<ns on a CPU> <ns waiting> <timeslices>`.
pub fn parse(schedstat: &str) -> Option<ThreadTimes> {
    let mut fields = schedstat.split_whitespace();
    let mut next_ns = || fields.next()?.parse::<u64>().ok();
    Some(ThreadTimes {
        on_cpu: Duration::from_nanos(next_ns()?),
        waiting: Duration::from_nanos(next_ns()?),
    })
}

/// Thread `tid` of process `pid`'s times; `None` if the thread is gone or the kernel keeps no
/// schedstats.
pub fn of_thread(pid: u32, tid: u32) -> Option<ThreadTimes> {
    parse(&std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat")).ok()?)
}

/// The id of the calling thread, as /proc names it.
pub fn current_tid() -> u32 {
    // SAFETY: gettid takes no arguments and cannot fail.
    let tid = unsafe { libc::gettid() };
    tid as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wait is the second field, not the first (the time on a CPU); a line that is not a
    /// schedstat line gives nothing rather than a wrong figure.
    #[test]
    fn a_schedstat_line_gives_the_time_on_a_cpu_then_the_wait() {
        assert_eq!(
            parse("7000 42000 3\n"),
            Some(ThreadTimes {
                on_cpu: Duration::from_micros(7),
                waiting: Duration::from_micros(42),
            })
        );
        assert_eq!(parse("7000\n"), None);
        assert_eq!(parse("x 1 2"), None);
        // This thread's own, once it has run and been switched out (which accounts its time).
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_millis(5) {
            std::hint::spin_loop();
        }
        std::thread::sleep(Duration::from_millis(1));
        let mine = of_thread(std::process::id(), current_tid()).expect("schedstats here");
        assert!(mine.on_cpu > Duration::ZERO, "{mine:?}");
    }
}
