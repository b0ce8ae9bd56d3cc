//! Initial-sync progress for the operator: a bar redrawn in place when stderr is a terminal
//! (bytes, rate, ETA, files), plain log lines every `LOG_INTERVAL` when it is not.
//!
//! The total is an estimate made from the leader's index and this follower's inventory (what it
//! lacks, assuming its prefixes match); a mismatched copy is re-sent whole, so the bar can reach
//! its end early and then hold at 99% until the sync is done.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use crate::index::human_bytes;

const REDRAW_INTERVAL: Duration = Duration::from_millis(100);
const LOG_INTERVAL: Duration = Duration::from_secs(5);
const BAR_WIDTH: usize = 30;

pub struct Progress {
    tty: bool,
    files_total: usize,
    bytes_expected: u64,
    bytes_received: u64,
    started: Instant,
    shown_at: Option<Instant>,
}

impl Progress {
    pub fn new(files_total: usize, bytes_expected: u64) -> Progress {
        Progress {
            tty: std::io::stderr().is_terminal(),
            files_total,
            bytes_expected,
            bytes_received: 0,
            started: Instant::now(),
            shown_at: None,
        }
    }

    fn line(&self) -> String {
        let elapsed_s = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = self.bytes_received as f64 / elapsed_s;
        let fraction = if self.bytes_expected == 0 {
            1.0
        } else {
            (self.bytes_received as f64 / self.bytes_expected as f64).min(0.99)
        };
        let left = self.bytes_expected.saturating_sub(self.bytes_received) as f64;
        let eta = if rate > 0.0 {
            format!("{:.0} s", left / rate)
        } else {
            "?".into()
        };
        format!(
            "{:>3}%  {} of ~{}  {}/s  ETA {eta}  ({} files in the index)",
            (fraction * 100.0) as u32,
            human_bytes(self.bytes_received as f64),
            human_bytes(self.bytes_expected as f64),
            human_bytes(rate),
            self.files_total
        )
    }

    /// `len_bytes` more payload bytes arrived.
    pub fn on_bytes(&mut self, len_bytes: u64) {
        self.bytes_received += len_bytes;
        let now = Instant::now();
        let interval = if self.tty {
            REDRAW_INTERVAL
        } else {
            LOG_INTERVAL
        };
        if self
            .shown_at
            .is_some_and(|at| now.duration_since(at) < interval)
        {
            return;
        }
        self.shown_at = Some(now);
        if self.tty {
            let fraction = if self.bytes_expected == 0 {
                1.0
            } else {
                (self.bytes_received as f64 / self.bytes_expected as f64).min(0.99)
            };
            let filled = (fraction * BAR_WIDTH as f64) as usize;
            let mut err = std::io::stderr();
            let _ = write!(
                err,
                "\r[{}{}] {}   ",
                "#".repeat(filled),
                " ".repeat(BAR_WIDTH - filled),
                self.line()
            );
            let _ = err.flush();
        } else {
            tracing::info!("initial sync: {}", self.line());
        }
    }

    /// The sync is done: the bar's line is ended (the driver logs the summary).
    pub fn finish(&mut self) {
        if self.tty && self.shown_at.is_some() {
            eprintln!("\r[{}] done{}", "#".repeat(BAR_WIDTH), " ".repeat(60));
        }
    }
}
