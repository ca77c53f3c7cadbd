//! `--trace FILE`: what each rank did when, as a Chrome trace (the JSON "Trace Event Format"
//! that Perfetto and chrome://tracing open). One process per rank (named by its stage and
//! data-parallel index), one thread row for the training thread and one for the data-parallel
//! communication thread: forward and backward per micro-batch and chunk, the exchanges with
//! other stages (the bubble shows as the gaps they wait through), gradient buckets, the
//! optimizer, validation and checkpoints. Times are microseconds since the Unix epoch, so the
//! ranks of one host line up when their traces are merged (the job's rank 0 merges them into
//! FILE at the end of the run).

use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Most events a rank keeps (later ones are counted, not kept): a trace is for a few hundred
/// steps, not a whole run.
pub const MAX_EVENTS: usize = 200_000;

/// One rank's events.
#[derive(Debug)]
pub struct Trace {
    pid: usize,
    label: String,
    /// `Instant` ↔ wall clock, fixed at creation.
    origin: (Instant, f64),
    events: Vec<String>,
    /// Events not kept (beyond [`MAX_EVENTS`]).
    pub dropped: u64,
}

/// The training thread's row.
pub const MAIN: u32 = 0;
/// The data-parallel communication thread's row.
pub const COMM: u32 = 1;

impl Trace {
    /// An empty trace for world rank `pid`, shown as `label`.
    pub fn new(pid: usize, label: String) -> Trace {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64() * 1e6);
        Trace {
            pid,
            label,
            origin: (Instant::now(), wall),
            events: Vec::new(),
            dropped: 0,
        }
    }

    fn us(&self, t: Instant) -> f64 {
        let (i0, w0) = self.origin;
        if t >= i0 {
            w0 + (t - i0).as_secs_f64() * 1e6
        } else {
            w0 - (i0 - t).as_secs_f64() * 1e6
        }
    }

    /// A span `name` of category `cat` on row `tid` from `start` to `end`.
    pub fn span(&mut self, tid: u32, cat: &str, name: &str, start: Instant, end: Instant) {
        if self.events.len() >= MAX_EVENTS {
            self.dropped += 1;
            return;
        }
        let (ts, te) = (self.us(start), self.us(end));
        self.events.push(format!(
            r#"{{"ph":"X","pid":{},"tid":{tid},"cat":{},"name":{},"ts":{ts:.1},"dur":{:.1}}}"#,
            self.pid,
            serde_json::Value::from(cat),
            serde_json::Value::from(name),
            (te - ts).max(0.0)
        ));
    }

    /// This rank's events as JSON array elements (comma-separated, no brackets), with the
    /// process and thread names first.
    pub fn body(&self) -> String {
        let mut out = vec![
            format!(
                r#"{{"ph":"M","pid":{},"name":"process_name","args":{{"name":{}}}}}"#,
                self.pid,
                serde_json::Value::from(self.label.as_str())
            ),
            format!(
                r#"{{"ph":"M","pid":{},"name":"process_sort_index","args":{{"sort_index":{}}}}}"#,
                self.pid, self.pid
            ),
            format!(
                r#"{{"ph":"M","pid":{},"tid":{MAIN},"name":"thread_name","args":{{"name":"training"}}}}"#,
                self.pid
            ),
            format!(
                r#"{{"ph":"M","pid":{},"tid":{COMM},"name":"thread_name","args":{{"name":"data-parallel buckets"}}}}"#,
                self.pid
            ),
        ];
        out.extend(self.events.iter().cloned());
        out.join(",\n")
    }
}

/// A whole trace file from the bodies of every rank.
pub fn file(bodies: &[String]) -> String {
    let parts: Vec<&str> = bodies
        .iter()
        .map(|b| b.as_str())
        .filter(|b| !b.is_empty())
        .collect();
    format!(
        "{{\"displayTimeUnit\":\"ms\",\"traceEvents\":[\n{}\n]}}\n",
        parts.join(",\n")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trace_is_valid_json_with_complete_events() {
        let mut t = Trace::new(3, "stage 1, dp 0".into());
        let a = Instant::now();
        let b = a + std::time::Duration::from_micros(250);
        t.span(MAIN, "compute", "F0 \"chunk\" 0", a, b);
        let text = file(&[t.body(), String::new()]);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let ev = v["traceEvents"].as_array().unwrap();
        assert_eq!(ev.len(), 5);
        let x = &ev[4];
        assert_eq!(x["ph"], "X");
        assert_eq!(x["pid"], 3);
        assert_eq!(x["name"], "F0 \"chunk\" 0");
        assert!((x["dur"].as_f64().unwrap() - 250.0).abs() < 1.0);
        assert_eq!(ev[0]["args"]["name"], "stage 1, dp 0");
    }
}
