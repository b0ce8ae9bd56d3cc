//! An error that repeats word for word at every retry (a node restarting a refused follower
//! every 2 s, a follower reconnecting to a leader that is down or declined every 5 s) is
//! logged when it first comes, then once a minute with how often it came; the retries between
//! are logged at debug. A daemon left in such a state for hours then says why, without burying
//! everything else in its log under the same line.

use std::time::{Duration, Instant};

/// How often an error that repeats word for word is logged at its level again.
pub const REPEATED_LOG_INTERVAL: Duration = Duration::from_secs(60);

#[derive(Default)]
pub struct Repeats {
    /// The last error, when it was logged at its level, and how often it came since.
    last: Option<(String, Instant, u32)>,
    /// The last error was a repeat, logged at debug: so is what follows it (the retry).
    quiet: bool,
}

impl Repeats {
    /// The line to log at the error's level for `message`, or `None` when it repeats the last
    /// one within `REPEATED_LOG_INTERVAL` (log it at debug).
    pub fn report(&mut self, message: &str, now: Instant) -> Option<String> {
        match &mut self.last {
            Some((last, at, repeats))
                if last == message && now.duration_since(*at) < REPEATED_LOG_INTERVAL =>
            {
                *repeats += 1;
                self.quiet = true;
                None
            }
            Some((last, at, repeats)) if last == message => {
                let line = format!(
                    "{message} (again; {} times in the last {} s)",
                    *repeats + 1,
                    now.duration_since(*at).as_secs()
                );
                (*at, *repeats) = (now, 0);
                self.quiet = false;
                Some(line)
            }
            _ => {
                self.last = Some((message.to_string(), now, 0));
                self.quiet = false;
                Some(message.to_string())
            }
        }
    }

    /// Whether the last error was a repeat logged at debug.
    pub fn quiet(&self) -> bool {
        self.quiet
    }

    /// Whatever comes next is news (a new leader; a connection that worked).
    pub fn forget(&mut self) {
        *self = Repeats::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_that_repeats_is_logged_once_a_minute_with_its_count() {
        let t0 = Instant::now();
        let mut r = Repeats::default();
        assert_eq!(
            r.report("wrong secret", t0).as_deref(),
            Some("wrong secret")
        );
        assert!(!r.quiet());
        for i in 1..30 {
            assert_eq!(
                r.report("wrong secret", t0 + Duration::from_secs(2 * i)),
                None
            );
            assert!(r.quiet());
        }
        let again = r
            .report("wrong secret", t0 + Duration::from_secs(61))
            .unwrap();
        assert_eq!(again, "wrong secret (again; 30 times in the last 61 s)");
        assert!(!r.quiet());
        assert_eq!(r.report("wrong secret", t0 + Duration::from_secs(63)), None);
        // Another error is news at once, and so is anything after `forget`.
        assert_eq!(
            r.report("declined", t0 + Duration::from_secs(64))
                .as_deref(),
            Some("declined")
        );
        r.forget();
        assert_eq!(
            r.report("declined", t0 + Duration::from_secs(65))
                .as_deref(),
            Some("declined")
        );
    }
}
