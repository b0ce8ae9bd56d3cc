//! `--probe-cpus A:B`: how long one cache line takes to go from CPU A to CPU B and back,
//! measured every `PROBE_WINDOW` for `--duration`, with nothing else of loadgen running.
//!
//! What a follower costs the writer's `append()` is mostly cache lines it must take back from
//! the CPU the leader's connection runs on (the writers' lock, the inbox, a path's reference
//! count). On a VM that round trip is the host's doing, and it can change by several times
//! from one second to the next, as the host moves the virtual CPUs around: run this before
//! trusting a writer-latency figure, and beside one that looks odd.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cpus;

/// How long each figure is averaged over.
pub const PROBE_WINDOW: Duration = Duration::from_millis(250);
/// Round trips between two looks at the clock.
const TRIPS_PER_CHECK: u64 = 1000;

/// The line the two threads pass back and forth: the main thread writes odd values, the other
/// answers with the next even one.
#[repr(align(64))]
struct Ball(AtomicU64);

/// One window: when it ended (seconds since the start) and its mean round trip.
pub struct ProbeSample {
    pub t_s: f64,
    pub round_trip_ns: f64,
}

pub fn run(a: usize, b: usize, duration: Duration) -> anyhow::Result<Vec<ProbeSample>> {
    if a == b {
        anyhow::bail!("--probe-cpus {a}:{b}: name two different CPUs");
    }
    let allowed = cpus::allowed()?;
    if let Some(c) = [a, b].into_iter().find(|c| !allowed.contains(c)) {
        anyhow::bail!(
            "--probe-cpus {a}:{b}: this process may not run on CPU {c} (only on {allowed:?})"
        );
    }
    let ball = Arc::new(Ball(AtomicU64::new(0)));
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let answerer = {
        let ball = ball.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let pinned = cpus::pin_to(b);
            let ok = pinned.is_ok();
            let _ = ready_tx.send(pinned);
            if !ok {
                return;
            }
            while !stop.load(Ordering::Relaxed) {
                let v = ball.0.load(Ordering::Acquire);
                if v % 2 == 1 {
                    ball.0.store(v + 1, Ordering::Release);
                } else {
                    std::hint::spin_loop();
                }
            }
        })
    };
    let result = (|| {
        ready_rx
            .recv()
            .map_err(|_| anyhow::anyhow!("the probe's thread on CPU {b} died"))?
            .map_err(|e| anyhow::anyhow!("--probe-cpus: cannot run on CPU {b}: {e}"))?;
        cpus::pin_to(a).map_err(|e| anyhow::anyhow!("--probe-cpus: cannot run on CPU {a}: {e}"))?;
        let started = Instant::now();
        let mut samples = Vec::new();
        let mut v = 0u64;
        while started.elapsed() < duration {
            let window_started = Instant::now();
            let mut trips = 0u64;
            while window_started.elapsed() < PROBE_WINDOW {
                for _ in 0..TRIPS_PER_CHECK {
                    ball.0.store(v + 1, Ordering::Release);
                    while ball.0.load(Ordering::Acquire) != v + 2 {
                        std::hint::spin_loop();
                    }
                    v += 2;
                }
                trips += TRIPS_PER_CHECK;
            }
            samples.push(ProbeSample {
                t_s: started.elapsed().as_secs_f64(),
                round_trip_ns: window_started.elapsed().as_nanos() as f64 / trips as f64,
            });
        }
        Ok(samples)
    })();
    stop.store(true, Ordering::Relaxed);
    let _ = answerer.join();
    result
}

/// The probe as JSON: `{probe_cpus: [A, B], window_ms, samples: [{t_s, round_trip_ns}]}`.
pub fn json(a: usize, b: usize, samples: &[ProbeSample]) -> String {
    let points: Vec<String> = samples
        .iter()
        .map(|s| {
            format!(
                "{{\"t_s\": {:.2}, \"round_trip_ns\": {:.0}}}",
                s.t_s, s.round_trip_ns
            )
        })
        .collect();
    format!(
        "{{\"probe_cpus\": [{a}, {b}], \"window_ms\": {}, \"samples\": [{}]}}\n",
        PROBE_WINDOW.as_millis(),
        points.join(", ")
    )
}

/// The lines loadgen prints for a probe.
pub fn summary(a: usize, b: usize, samples: &[ProbeSample]) -> String {
    let mut sorted: Vec<f64> = samples.iter().map(|s| s.round_trip_ns).collect();
    sorted.sort_by(f64::total_cmp);
    let (Some(&min), Some(&max)) = (sorted.first(), sorted.last()) else {
        return "no samples\n".into();
    };
    let median = sorted[sorted.len() / 2];
    let slow = sorted.iter().filter(|&&ns| ns > 2.0 * min).count();
    let series: Vec<String> = samples
        .iter()
        .map(|s| format!("{:.0}", s.round_trip_ns))
        .collect();
    format!(
        "cache line round trip CPU {a} <-> CPU {b}, every {} ms: {}\n\
         min {min:.0} ns, median {median:.0} ns, max {max:.0} ns; {slow} of {} windows above twice the min\n",
        PROBE_WINDOW.as_millis(),
        series.join(" "),
        sorted.len()
    )
}
