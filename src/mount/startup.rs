//! The start-up clock of a mount daemon: how long each phase took, from the
//! moment `mount` spawned the daemon until every mountpoint answered, logged
//! at info level as one `start-up phases:` line (what the mount benchmark
//! prints, and where a slow mount shows what it waited on).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The phases of one daemon's start-up, in order.
pub struct Phases {
    began: Instant,
    last: Instant,
    done: Vec<(&'static str, Duration)>,
}

impl Phases {
    /// Starts the clock. `spawned_at` is when `mount` spawned this process
    /// (nanoseconds since the Unix epoch); the time from then until now is
    /// the first phase, `process start`.
    pub fn begin(spawned_at: Option<u64>) -> Self {
        let now = Instant::now();
        let mut done = Vec::new();
        if let Some(ns) = spawned_at {
            let since_epoch = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            done.push((
                "process start",
                since_epoch.saturating_sub(Duration::from_nanos(ns)),
            ));
        }
        Phases {
            began: now,
            last: now,
            done,
        }
    }

    /// Ends the phase `name` now.
    pub fn mark(&mut self, name: &'static str) {
        let now = Instant::now();
        self.add(name, now - self.last);
        self.last = now;
    }

    /// Ends a phase now that was measured in `parts` (time outside them is
    /// `rest`): e.g. opening the archive as its requests and its decoding.
    pub fn mark_parts(&mut self, parts: &[(&'static str, Duration)], rest: &'static str) {
        let now = Instant::now();
        let measured: Duration = parts.iter().map(|(_, d)| *d).sum();
        for &(name, d) in parts {
            self.add(name, d);
        }
        self.add(rest, (now - self.last).saturating_sub(measured));
        self.last = now;
    }

    /// Adds `d` to phase `name` (phases repeated per mountpoint add up).
    fn add(&mut self, name: &'static str, d: Duration) {
        match self.done.iter_mut().find(|(n, _)| *n == name) {
            Some((_, total)) => *total += d,
            None => self.done.push((name, d)),
        }
    }

    /// Since [`Phases::begin`], excluding `process start`.
    pub fn elapsed(&self) -> Duration {
        self.began.elapsed()
    }

    /// `name 1.2 ms, …, total 80.1 ms`.
    pub fn render(&self) -> String {
        let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1e3);
        let total: Duration = self.done.iter().map(|(_, d)| *d).sum();
        let mut out: Vec<String> = self
            .done
            .iter()
            .map(|(n, d)| format!("{n} {}", ms(*d)))
            .collect();
        out.push(format!("total {}", ms(total)));
        out.join(", ")
    }

    /// Logs the phases at info level.
    pub fn log(&self) {
        tracing::info!("start-up phases: {}", self.render());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_add_up_and_repeat_into_one() {
        let mut p = Phases::begin(None);
        p.mark("a");
        p.mark_parts(&[("b", Duration::from_millis(2))], "c");
        p.mark("a");
        let names: Vec<&str> = p.done.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert!(p.render().starts_with("a ") && p.render().contains("total "));
    }
}
