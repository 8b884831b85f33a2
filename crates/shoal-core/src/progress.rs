//! A progress bar redrawn by its own thread.
//!
//! The driver only stores two counters (atomics, no lock, no I/O), so reporting progress costs
//! the hot path nothing; a background thread reads them every interval and redraws one line
//! on the terminal. [`render`] is a pure function, tested on its own.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

struct Counters {
    done: AtomicU64,
    failed: AtomicU64,
    stop: AtomicBool,
    wake: (Mutex<()>, Condvar),
}

/// A live progress bar (see the module docs). Dropping it draws the final state.
pub struct Progress {
    counters: Arc<Counters>,
    thread: Option<JoinHandle<()>>,
}

fn clock(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
    } else {
        format!("{:02}:{:02}", s / 60, s % 60)
    }
}

/// One line of progress: bar, percentage, counts, elapsed, ETA, rate and failures.
///
/// With an unknown `total` the bar and ETA are left out.
pub fn render(
    label: &str,
    done: u64,
    failed: u64,
    total: Option<u64>,
    elapsed: Duration,
    width: usize,
) -> String {
    let secs = elapsed.as_secs_f64();
    let finished = done + failed;
    let rate = if secs > 0.0 {
        finished as f64 / secs
    } else {
        0.0
    };
    let mut line = String::new();
    if !label.is_empty() {
        line.push_str(label);
        line.push(' ');
    }
    match total {
        Some(total) if total > 0 => {
            let frac = (finished as f64 / total as f64).clamp(0.0, 1.0);
            let filled = (frac * width as f64).floor() as usize;
            line.push('|');
            line.push_str(&"#".repeat(filled));
            line.push_str(&"-".repeat(width.saturating_sub(filled)));
            line.push_str(&format!("| {:>3.0}% {finished}/{total}", frac * 100.0));
            let eta = if rate > 0.0 {
                clock(total.saturating_sub(finished) as f64 / rate)
            } else {
                "?".into()
            };
            line.push_str(&format!(" [{}<{eta}, {rate:.1} it/s", clock(secs)));
        }
        _ => line.push_str(&format!("{finished} done [{}, {rate:.1} it/s", clock(secs))),
    }
    if failed > 0 {
        line.push_str(&format!(", {failed} failed"));
    }
    line.push(']');
    line
}

impl Progress {
    /// Starts the redraw thread, writing to `out` every `interval`.
    pub fn start(
        label: String,
        total: Option<u64>,
        interval: Duration,
        mut out: Box<dyn Write + Send>,
    ) -> std::io::Result<Progress> {
        let counters = Arc::new(Counters {
            done: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            wake: (Mutex::new(()), Condvar::new()),
        });
        let c = counters.clone();
        let started = Instant::now();
        let thread = thread::Builder::new()
            .name("shoal-progress".into())
            .spawn(move || {
                let mut last_len: usize = 0;
                loop {
                    let stopping = c.stop.load(Ordering::SeqCst);
                    let line = render(
                        &label,
                        c.done.load(Ordering::Relaxed),
                        c.failed.load(Ordering::Relaxed),
                        total,
                        started.elapsed(),
                        30,
                    );
                    // Pad to erase a longer previous line; \r returns to the line start.
                    let pad = last_len.saturating_sub(line.len());
                    let _ = write!(out, "\r{line}{}", " ".repeat(pad));
                    last_len = line.len();
                    if stopping {
                        let _ = writeln!(out);
                        let _ = out.flush();
                        return;
                    }
                    let _ = out.flush();
                    let guard = c.wake.0.lock().unwrap_or_else(|e| e.into_inner());
                    let _ = c.wake.1.wait_timeout(guard, interval);
                }
            })?;
        Ok(Progress {
            counters,
            thread: Some(thread),
        })
    }

    /// Sets the counts (items done, items failed).
    pub fn update(&self, done: u64, failed: u64) {
        self.counters.done.store(done, Ordering::Relaxed);
        self.counters.failed.store(failed, Ordering::Relaxed);
    }

    /// Draws the final state and stops the thread. Idempotent.
    pub fn finish(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.counters.stop.store(true, Ordering::SeqCst);
            self.counters.wake.1.notify_all();
            let _ = thread.join();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_total() {
        let line = render("map", 450, 0, Some(1000), Duration::from_secs(2), 10);
        assert_eq!(
            line,
            "map |####------|  45% 450/1000 [00:02<00:02, 225.0 it/s]"
        );
    }

    #[test]
    fn failures_and_completion() {
        let line = render("", 8, 2, Some(10), Duration::from_secs(1), 4);
        assert_eq!(line, "|####| 100% 10/10 [00:01<00:00, 10.0 it/s, 2 failed]");
    }

    #[test]
    fn unknown_total() {
        let line = render("imap", 42, 0, None, Duration::from_secs(65), 10);
        assert_eq!(line, "imap 42 done [01:05, 0.6 it/s]");
    }

    #[test]
    fn start_update_finish_writes_the_final_state() {
        #[derive(Clone, Default)]
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl Write for Sink {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let mut p = Progress::start(
            "t".into(),
            Some(4),
            Duration::from_millis(5),
            Box::new(sink.clone()),
        )
        .unwrap();
        p.update(4, 0);
        p.finish();
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        assert!(
            text.ends_with("4/4 [00:00<00:00, 0.0 it/s]\n") || text.contains("100% 4/4"),
            "{text:?}"
        );
        assert!(text.trim_end().ends_with(']'));
    }
}
