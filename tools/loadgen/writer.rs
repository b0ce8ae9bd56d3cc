//! The writers and the confirmer: messages into segments, each told to the leader (or written
//! for `ferry lead` to see), and the time from each `append()` to acked by every follower.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::report::{histogram, AckSample, WriterSample};
use crate::segments::SegmentWriter;
use crate::{cpus, raw, Shared, CONVERGE_TIMEOUT, SAMPLE_INTERVAL};
use ferry::leader::Leader;

/// Messages a writer hands to the confirmer at once, at most.
const CONFIRM_BATCH: usize = 1024;
/// How long a message may wait in a writer's batch before the batch goes to the confirmer (a
/// writer that is about to sleep, under `--rate`, hands its batch over first).
const CONFIRM_DELAY_MAX: Duration = Duration::from_micros(50);

pub struct WriterPlan {
    pub id: usize,
    pub dir: PathBuf,
    /// Whom the writer tells of each message; none in write mode (`ferry lead` watches).
    pub sink: Option<Sink>,
    pub shared: Arc<Shared>,
    pub tx: mpsc::Sender<Vec<Appended>>,
    pub size: (usize, usize),
    pub segment_bytes: u64,
    /// Through a shared mapping, or with write(2).
    pub mmap: bool,
    /// `--writer-cpu`.
    pub cpu: Option<usize>,
    pub rate: f64,
    pub messages: Option<u64>,
    pub deadline: Option<Instant>,
    /// When the run started: the time axis of the writer's samples.
    pub run_started: Instant,
}

/// Where a library-style writer reports its appends.
pub enum Sink {
    Leader(Arc<Leader>),
    /// `--mode raw`.
    Raw(Arc<raw::Fanout>),
}

impl Sink {
    /// The position that covers the append, for the confirmer.
    fn append(&self, path: &str, offset: u64, len_bytes: u64) -> anyhow::Result<u64> {
        Ok(match self {
            Sink::Leader(leader) => leader.append(path, offset, len_bytes)?,
            Sink::Raw(fanout) => fanout.append(path, offset, len_bytes),
        })
    }
}

type Hist = hdrhistogram::Histogram<u64>;

/// What one writer measured.
pub struct WriterResult {
    /// `append()` call latencies (ns), outside and during faults.
    pub normal: Hist,
    pub fault: Hist,
    /// Those made before the first fault: the same run's baseline for `fault` (with
    /// `--join-follower` alone, before any follower).
    pub before_faults: Hist,
    /// The p99 of each `SAMPLE_INTERVAL`.
    pub samples: Vec<WriterSample>,
    /// When its last message was appended.
    pub done_at: Instant,
}

/// One writer: messages into segments, each told to the leader.
pub fn write_loop(plan: WriterPlan) -> anyhow::Result<WriterResult> {
    if let Some(cpu) = plan.cpu {
        cpus::pin_to(cpu).with_context(|| format!("cannot pin a writer to CPU {cpu}"))?;
    }
    let mut segments = SegmentWriter::new(&plan.dir, plan.id, plan.segment_bytes, plan.mmap);
    let mut normal = histogram();
    let mut fault = histogram();
    let mut before_faults = histogram();
    let mut fault_seen = false;
    let mut window = histogram();
    let mut window_started = Instant::now();
    let mut samples = Vec::new();
    let payload: Vec<u8> = (0..plan.size.1)
        .map(|i| (i * 131 + plan.id * 7) as u8)
        .collect();
    let mut batch = Vec::with_capacity(CONFIRM_BATCH);
    let mut rng = 0x9e37_79b9_7f4a_7c15_u64 ^ plan.id as u64;
    let started = Instant::now();
    let mut sent = 0u64;
    loop {
        if plan.messages.is_some_and(|m| sent >= m)
            || plan.deadline.is_some_and(|d| Instant::now() >= d)
        {
            break;
        }
        if plan.rate > 0.0 {
            let due = started + Duration::from_secs_f64(sent as f64 / plan.rate);
            let now = Instant::now();
            if due > now {
                // Nothing else would hand the batch over while the writer sleeps: at a low
                // rate its messages would wait for the next one, and the confirmer would
                // count that wait as replication latency.
                if !batch.is_empty() {
                    let _ = plan.tx.send(std::mem::replace(
                        &mut batch,
                        Vec::with_capacity(CONFIRM_BATCH),
                    ));
                }
                std::thread::sleep(due - now);
            }
        }
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let len = plan.size.0 + (rng as usize) % (plan.size.1 - plan.size.0 + 1);
        let written = segments.write(&payload[..len])?;
        if let Some(sink) = &plan.sink {
            let in_fault = plan.shared.in_fault.load(Ordering::Relaxed);
            let t0 = Instant::now();
            let position = sink.append(written.path, written.offset, len as u64)?;
            let ns = t0.elapsed().as_nanos() as u64;
            let _ = if in_fault {
                fault.record(ns.max(1))
            } else {
                normal.record(ns.max(1))
            };
            fault_seen |= in_fault;
            if !fault_seen {
                let _ = before_faults.record(ns.max(1));
            }
            let _ = window.record(ns.max(1));
            if t0.duration_since(window_started) >= SAMPLE_INTERVAL {
                // Between two timed calls: what this takes (a walk of the histogram, tens of
                // microseconds every 100 ms) is caught up on at the next messages.
                samples.push(WriterSample {
                    t_s: t0.duration_since(plan.run_started).as_secs_f64(),
                    append_call_p99_ns: window.value_at_quantile(0.99),
                });
                window.reset();
                window_started = t0;
            }
            batch.push(Appended::new(position, t0, in_fault));
            // Handed over when full or when its oldest entry has waited CONFIRM_DELAY_MAX, so
            // batching adds at most that much to the measured latency.
            let oldest = batch.first().map_or(t0, Appended::at);
            if batch.len() == CONFIRM_BATCH || t0.duration_since(oldest) >= CONFIRM_DELAY_MAX {
                let _ = plan.tx.send(std::mem::replace(
                    &mut batch,
                    Vec::with_capacity(CONFIRM_BATCH),
                ));
            }
        }
        sent += 1;
        plan.shared.messages.fetch_add(1, Ordering::Relaxed);
        plan.shared.bytes.fetch_add(len as u64, Ordering::Relaxed);
    }
    let done_at = Instant::now();
    if !batch.is_empty() {
        let _ = plan.tx.send(batch);
    }
    segments.finish()?;
    Ok(WriterResult {
        normal,
        fault,
        before_faults,
        samples,
        done_at,
    })
}

/// One timed append on its way to the confirmer. The confirmer queues one per message until
/// it is acked: millions when followers lag, inside the embedded leader's process, whose RSS
/// the run reports. So it is 16 bytes (a position, a time and a flag as three fields took 32).
#[derive(Clone, Copy)]
pub struct Appended {
    position: u64,
    /// Nanoseconds from `epoch()`, shifted left by one; the low bit is set during a fault.
    at_ns_fault: u64,
}

/// The time `Appended` counts from: the first call to this (2^63 ns after it is 292 years).
pub fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl Appended {
    fn new(position: u64, at: Instant, in_fault: bool) -> Appended {
        let ns = at.saturating_duration_since(epoch()).as_nanos() as u64;
        Appended {
            position,
            at_ns_fault: (ns << 1) | u64::from(in_fault),
        }
    }

    fn at(&self) -> Instant {
        epoch() + Duration::from_nanos(self.at_ns_fault >> 1)
    }

    fn in_fault(&self) -> bool {
        self.at_ns_fault & 1 == 1
    }
}

/// What the confirmer measured.
pub struct Confirmed {
    /// Append-to-ack latencies (us), outside and during faults.
    pub normal: Hist,
    pub fault: Hist,
    /// The most bytes its queue of appends not yet acked had allocated: it grows with the
    /// followers' lag, and in library mode it is part of the leader process's RSS.
    pub queue_peak_bytes: u64,
    /// Per `SAMPLE_INTERVAL` of append time since `run_started`.
    pub ack_samples: Vec<AckSample>,
}

/// The latencies of the messages appended in each `SAMPLE_INTERVAL`, reported once every
/// message of an interval has surely been acked. Writers hand their batches over at most
/// `CONFIRM_DELAY_MAX` late, so an interval is closed once a message appended
/// `ACK_WINDOWS_OPEN` intervals after it is counted; a straggler from a closed interval counts
/// in the first interval not closed yet. The confirmer meets the intervals nearly in order:
/// the one a message belongs to is looked for from the newest.
struct AckWindows {
    run_started: Instant,
    /// Open intervals, oldest first, with their latencies (us).
    open: std::collections::VecDeque<(u64, Hist)>,
    closed_below: u64,
    samples: Vec<AckSample>,
}

/// Intervals of append time kept open for late batches (a few KiB each).
const ACK_WINDOWS_OPEN: u64 = 10;

impl AckWindows {
    fn new(run_started: Instant) -> AckWindows {
        AckWindows {
            run_started,
            open: Default::default(),
            closed_below: 0,
            samples: Vec::new(),
        }
    }

    fn record(&mut self, appended_at: Instant, us: u64) {
        let since_start_ns = appended_at
            .saturating_duration_since(self.run_started)
            .as_nanos() as u64;
        let index = (since_start_ns / SAMPLE_INTERVAL.as_nanos() as u64).max(self.closed_below);
        let at = match self.open.iter().rposition(|&(i, _)| i <= index) {
            Some(at) if self.open[at].0 == index => at,
            found => {
                let at = found.map_or(0, |at| at + 1);
                // Two significant digits: enough to read a tail, and a small histogram.
                let h = Hist::new(2).unwrap_or_else(|_| unreachable!("2 digits are valid"));
                self.open.insert(at, (index, h));
                at
            }
        };
        let _ = self.open[at].1.record(us);
        while self
            .open
            .front()
            .is_some_and(|&(oldest, _)| oldest + ACK_WINDOWS_OPEN <= index)
        {
            self.close_oldest();
        }
    }

    fn close_oldest(&mut self) {
        if let Some((index, h)) = self.open.pop_front() {
            self.closed_below = index + 1;
            self.samples.push(AckSample {
                t_s: ((index + 1) as u128 * SAMPLE_INTERVAL.as_millis()) as f64 / 1000.0,
                messages: h.len(),
                append_to_ack_p99_us: h.value_at_quantile(0.99),
                append_to_ack_max_us: h.max(),
            });
        }
    }

    fn finish(mut self) -> Vec<AckSample> {
        while !self.open.is_empty() {
            self.close_oldest();
        }
        self.samples
    }
}

/// Matches appended positions with the position every follower has acked; `wait_acked_beyond`
/// is `Leader::wait_acked_beyond` at the run's durability and follower count.
pub fn confirm(
    mut wait_acked_beyond: impl FnMut(u64, Duration) -> u64,
    rx: mpsc::Receiver<Vec<Appended>>,
    run_started: Instant,
) -> Confirmed {
    let mut normal = histogram();
    let mut fault = histogram();
    let mut windows = AckWindows::new(run_started);
    let mut pending: std::collections::VecDeque<Appended> = Default::default();
    // What the queue's allocation held at most: its capacity, which doubling leaves at up to
    // twice the appends in it, and which is what the process's RSS carries.
    let mut pending_capacity_max = 0;
    let mut acked = 0;
    let mut senders_gone_at: Option<Instant> = None;
    loop {
        loop {
            match rx.try_recv() {
                Ok(batch) => pending.extend(batch),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    senders_gone_at.get_or_insert_with(Instant::now);
                    break;
                }
            }
        }
        pending_capacity_max = pending_capacity_max.max(pending.capacity());
        if pending.is_empty() {
            if senders_gone_at.is_some() {
                break;
            }
            if let Ok(batch) = rx.recv_timeout(Duration::from_millis(50)) {
                pending.extend(batch);
            }
            continue;
        }
        // What the last ack already covers (a batch handed over after it) is counted now.
        if pending.front().is_some_and(|a| a.position > acked) {
            acked = wait_acked_beyond(acked, Duration::from_millis(50));
        }
        let now = Instant::now();
        while let Some(&appended) = pending.front() {
            if appended.position > acked {
                break;
            }
            let us = (now.duration_since(appended.at()).as_micros() as u64).max(1);
            let _ = if appended.in_fault() {
                fault.record(us)
            } else {
                normal.record(us)
            };
            windows.record(appended.at(), us);
            pending.pop_front();
        }
        // Followers that never ack everything do not keep the run from ending.
        if pending.front().is_some()
            && senders_gone_at.is_some_and(|at| at.elapsed() > CONVERGE_TIMEOUT)
        {
            break;
        }
    }
    let entry_bytes = std::mem::size_of::<Appended>();
    Confirmed {
        normal,
        fault,
        queue_peak_bytes: (pending_capacity_max * entry_bytes) as u64,
        ack_samples: windows.finish(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// An append keeps its position, its time (to the nanosecond) and its fault flag in 16
    /// bytes.
    #[test]
    fn an_append_keeps_its_position_time_and_fault_in_16_bytes() {
        assert_eq!(std::mem::size_of::<Appended>(), 16);
        let t = epoch() + Duration::from_nanos(1_234_567_891);
        for in_fault in [false, true] {
            let a = Appended::new(u64::MAX - 7, t, in_fault);
            assert_eq!(a.position, u64::MAX - 7);
            assert_eq!(a.at(), t);
            assert_eq!(a.in_fault(), in_fault);
        }
    }

    /// Each message's latency also counts in the `SAMPLE_INTERVAL` it was appended in, from
    /// the run's start, so a tail can be placed in time (`ack_samples`).
    #[test]
    fn latencies_are_also_reported_per_interval_of_append_time() {
        // Times are kept from `epoch()`, as a run starts after it; the messages below are
        // appended up to 250 ms after it, all in the past once acked.
        let run_started = epoch();
        std::thread::sleep(Duration::from_millis(300));
        let (tx, rx) = mpsc::channel();
        // Appended 50 and 60 ms into the run (the first interval), then 250 ms in (the third);
        // all acked at once, so the first interval's wait is 200 ms longer than the third's.
        let at = |ms| run_started + Duration::from_millis(ms);
        tx.send(vec![
            Appended::new(1, at(50), false),
            Appended::new(2, at(60), false),
            Appended::new(3, at(250), false),
        ])
        .unwrap();
        drop(tx);
        let confirmed = confirm(|_, _| 3, rx, run_started);
        let windows: Vec<(f64, u64)> = confirmed
            .ack_samples
            .iter()
            .map(|w| (w.t_s, w.messages))
            .collect();
        assert_eq!(windows, vec![(0.1, 2), (0.3, 1)]);
        let (first, third) = (&confirmed.ack_samples[0], &confirmed.ack_samples[1]);
        // Two significant digits: within 1% of each figure.
        let longer_us = first
            .append_to_ack_max_us
            .abs_diff(third.append_to_ack_max_us);
        assert!(longer_us.abs_diff(200_000) < 10_000, "{first:?} {third:?}");
        assert_eq!(first.append_to_ack_p99_us, first.append_to_ack_max_us);
    }

    /// Intervals met out of order are reported in order; one is closed once a message from
    /// `ACK_WINDOWS_OPEN` intervals later is counted, and a straggler for it then counts in the
    /// first interval still open, not in a second report of its own.
    #[test]
    fn ack_intervals_are_reported_in_order_and_once_each() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut windows = AckWindows::new(t0);
        windows.record(at(250), 5);
        windows.record(at(50), 7);
        // 1.35 s in: the intervals up to 0.3 s are closed.
        windows.record(at(1350), 9);
        windows.record(at(150), 11);
        let samples: Vec<(f64, u64, u64)> = windows
            .finish()
            .iter()
            .map(|w| (w.t_s, w.messages, w.append_to_ack_max_us))
            .collect();
        assert_eq!(
            samples,
            vec![(0.1, 1, 7), (0.3, 1, 5), (0.4, 1, 11), (1.4, 1, 9)]
        );
    }

    /// A batch that reaches the confirmer after the ack covering it was seen is counted at
    /// once. Waiting for a further ack instead added the wait's 50 ms timeout to the last
    /// messages of a run, where no further ack comes: the reported max was 51 ms.
    #[test]
    fn positions_already_acked_are_counted_without_waiting_for_another_ack() {
        let (tx, rx) = mpsc::channel();
        tx.send(vec![Appended::new(5, Instant::now(), false)])
            .unwrap();
        let tx = RefCell::new(Some(tx));
        let mut waits = Vec::new();
        let confirmed = confirm(
            |beyond, _| {
                waits.push(beyond);
                // While the confirmer waits, the writer hands over its last batch (covered by
                // the ack about to be returned) and stops.
                if let Some(tx) = tx.borrow_mut().take() {
                    tx.send(vec![Appended::new(8, Instant::now(), false)])
                        .unwrap();
                }
                10
            },
            rx,
            Instant::now(),
        );
        assert_eq!(confirmed.normal.len(), 2, "both messages are counted");
        assert_eq!(waits, vec![0], "one wait, for the first ack only");
    }
}
