//! `launch --max-restarts N` (torchrun's flag): when a process of the job fails, the launcher
//! stops the others (as without the flag), waits a back-off, and starts every process again, up
//! to N times. A `scaletrain train` command is restarted with `--resume` once it has published a
//! checkpoint in this launch, so it continues from the newest one bit for bit (the training loop
//! is a pure function of the checkpoint); any other command is started again as it was, with
//! `SCALETRAIN_RESTART_COUNT` (and torchrun's `TORCHELASTIC_RESTART_COUNT`) telling it which
//! attempt it is. Each restart is one JSON line in the run folder's `restarts.jsonl` and one
//! line on stderr: which rank failed and how, when, the step recorded and the step resumed
//! from, and the time lost.

use super::Outcome;
use anyhow::{bail, Result};
use clap::Args;
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Restart flags of `scaletrain launch`.
#[derive(Debug, Args, Clone)]
pub struct RestartArgs {
    /// Restart the whole job up to this many times when a process fails (torchrun's flag). A
    /// `scaletrain train` job resumes from the newest checkpoint it has published; each restart
    /// is logged in the run folder's restarts.jsonl. 0: a failed process ends the job.
    #[arg(long, default_value_t = 0)]
    pub max_restarts: usize,
    /// Seconds to wait before the first restart; doubled before each further one, at most 60.
    #[arg(long, default_value_t = 1.0)]
    pub restart_backoff_secs: f64,
}

impl Default for RestartArgs {
    fn default() -> Self {
        RestartArgs {
            max_restarts: 0,
            restart_backoff_secs: 1.0,
        }
    }
}

/// Longest back-off between two attempts.
const MAX_BACKOFF_SECS: f64 = 60.0;

impl RestartArgs {
    /// Refuses a back-off that is not a finite, non-negative number of seconds.
    pub fn check(&self) -> Result<()> {
        let b = self.restart_backoff_secs;
        if !(b.is_finite() && b >= 0.0) {
            bail!("--restart-backoff-secs {b}: expected a number of seconds ≥ 0 (e.g. 1)");
        }
        Ok(())
    }

    /// The wait before restart number `n` (1-based): the back-off doubled n − 1 times, capped.
    pub fn backoff(&self, n: usize) -> Duration {
        let secs = self.restart_backoff_secs * 2f64.powi(n.saturating_sub(1).min(30) as i32);
        Duration::from_secs_f64(secs.min(MAX_BACKOFF_SECS))
    }
}

/// A `scaletrain train` command: where it writes, and whether it resumes already.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainJob {
    /// Its run folder (`--out`, default `runs/default`).
    pub out: PathBuf,
    /// Whether the command itself says `--resume`.
    pub resumes: bool,
}

impl TrainJob {
    /// The training command in `command` (this program, or one named `scaletrain`, with the
    /// `train` subcommand), if it is one.
    pub fn detect(command: &[String]) -> Option<TrainJob> {
        let (program, args) = command.split_first()?;
        let ours = std::env::current_exe()
            .ok()
            .is_some_and(|e| e == Path::new(program))
            || Path::new(program).file_name().and_then(|n| n.to_str()) == Some("scaletrain");
        if !ours || args.first().map(String::as_str) != Some("train") {
            return None;
        }
        let mut out = PathBuf::from("runs/default");
        let mut it = args.iter();
        while let Some(w) = it.next() {
            if w == "--out" {
                if let Some(v) = it.next() {
                    out = PathBuf::from(v);
                }
            } else if let Some(v) = w.strip_prefix("--out=") {
                out = PathBuf::from(v);
            }
        }
        Some(TrainJob {
            out,
            resumes: args.iter().any(|w| w == "--resume"),
        })
    }

    /// The newest checkpoint of the run folder published at or after `since`: (step, when).
    pub fn newest_since(&self, since: SystemTime) -> Option<(u64, SystemTime)> {
        train::checkpoint::list(&self.out)
            .into_iter()
            .find_map(|(step, manifest)| {
                let t = std::fs::metadata(&manifest).ok()?.modified().ok()?;
                (t >= since).then_some((step, t))
            })
    }

    /// The newest step in the run folder's `metrics.jsonl` (written at every step, flushed at
    /// every evaluation and checkpoint, so a lower bound of the step a killed run reached).
    pub fn last_recorded_step(&self) -> Option<u64> {
        let text = std::fs::read_to_string(self.out.join("metrics.jsonl")).ok()?;
        text.lines().rev().find_map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()?
                .get("step")?
                .as_u64()
        })
    }
}

/// `command` made to continue from the newest checkpoint: `--overwrite` dropped (it would
/// delete the checkpoints), `--resume` added after the subcommand if missing.
pub fn resume_command(command: &[String]) -> Vec<String> {
    let mut c: Vec<String> = command
        .iter()
        .filter(|w| *w != "--overwrite")
        .cloned()
        .collect();
    if !c.iter().any(|w| w == "--resume") {
        let at = 2.min(c.len());
        c.insert(at, "--resume".into());
    }
    c
}

/// One restart, as logged (a line of `restarts.jsonl`).
#[derive(Debug, Clone, Serialize)]
pub struct RestartRecord {
    /// 1 for the first restart.
    pub restart: usize,
    /// World rank of the process that failed first.
    pub failed_rank: usize,
    /// How it ended ("was killed by signal 9 (SIGKILL)").
    pub how: String,
    /// When the failure was seen (seconds since the Unix epoch).
    pub detected_unix_secs: f64,
    /// Seconds since the launch began.
    pub secs_into_launch: f64,
    /// Newest step in metrics.jsonl when it failed (a lower bound of the step reached).
    pub last_recorded_step: Option<u64>,
    /// Step the restart resumes from (`None`: no checkpoint yet, the job starts again).
    pub resume_step: Option<u64>,
    /// Steps trained since that checkpoint and lost (from metrics.jsonl, so at least this many).
    pub steps_lost: Option<u64>,
    /// Seconds of work lost: since the checkpoint resumed from (or since the attempt began),
    /// plus the back-off.
    pub secs_lost: f64,
    /// Back-off waited before restarting.
    pub backoff_secs: f64,
}

/// Decides, after each attempt, whether and how to start the job again.
pub struct Supervisor {
    args: RestartArgs,
    original: Vec<String>,
    train: Option<TrainJob>,
    launch_start: SystemTime,
    launch_clock: Instant,
    attempt_start: SystemTime,
    log: Vec<RestartRecord>,
}

fn unix_secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl Supervisor {
    /// A supervisor for `command` (the first attempt starts now).
    pub fn new(command: &[String], args: &RestartArgs) -> Supervisor {
        let now = SystemTime::now();
        Supervisor {
            args: args.clone(),
            original: command.to_vec(),
            train: TrainJob::detect(command),
            launch_start: now,
            launch_clock: Instant::now(),
            attempt_start: now,
            log: Vec::new(),
        }
    }

    /// Restarts so far.
    pub fn restarts(&self) -> usize {
        self.log.len()
    }

    /// After an attempt ended with `o`: `Ok(None)` when the job is done, the command of the
    /// next attempt when it should restart (after waiting the back-off), an error when it
    /// failed for good or was interrupted.
    pub fn next(&mut self, o: &Outcome) -> Result<Option<Vec<String>>> {
        let (rank, how) = match o {
            Outcome::Done => {
                if !self.log.is_empty() {
                    eprintln!("scaletrain launch: {}", self.summary());
                }
                return Ok(None);
            }
            Outcome::Paused => return Ok(None),
            Outcome::Interrupted { .. } => bail!("{}", o.message()),
            Outcome::Failed { rank, how, .. } => (*rank, how.clone()),
        };
        let n = self.log.len() + 1;
        if n > self.args.max_restarts {
            if self.args.max_restarts == 0 {
                bail!("{}", o.message());
            }
            bail!(
                "{}; gave up after {} restart(s) (--max-restarts {}){}",
                o.message(),
                self.log.len(),
                self.args.max_restarts,
                self.train.as_ref().map_or(String::new(), |t| format!(
                    "; see {}",
                    t.out.join("restarts.jsonl").display()
                ))
            );
        }
        let detected = SystemTime::now();
        let into_launch = self.launch_clock.elapsed().as_secs_f64();
        let backoff = self.args.backoff(n);
        eprintln!(
            "scaletrain launch: {}; restarting every process in {:.1} s (restart {n} of at most {})",
            o.message(),
            backoff.as_secs_f64(),
            self.args.max_restarts
        );
        let t = Instant::now();
        while t.elapsed() < backoff {
            if super::stop_requested() {
                bail!(
                    "interrupted while waiting to restart after: {}",
                    o.message()
                );
            }
            std::thread::sleep(Duration::from_millis(20).min(backoff));
        }
        let (resume, last) = match &self.train {
            Some(t) => (t.newest_since(self.launch_start), t.last_recorded_step()),
            None => (None, None),
        };
        let lost_from = resume
            .map(|(_, when)| when)
            .filter(|w| *w > self.attempt_start)
            .unwrap_or(self.attempt_start);
        let rec = RestartRecord {
            restart: n,
            failed_rank: rank,
            how,
            detected_unix_secs: unix_secs(detected),
            secs_into_launch: into_launch,
            last_recorded_step: last,
            resume_step: resume.map(|r| r.0),
            steps_lost: last.map(|l| l.saturating_sub(resume.map_or(0, |r| r.0))),
            secs_lost: detected
                .duration_since(lost_from)
                .map_or(0.0, |d| d.as_secs_f64())
                + backoff.as_secs_f64(),
            backoff_secs: backoff.as_secs_f64(),
        };
        let command = match &self.train {
            Some(t) if t.resumes || resume.is_some() => {
                eprintln!(
                    "scaletrain launch: resuming from {}",
                    resume.map_or("the newest checkpoint".into(), |r| format!(
                        "the checkpoint of step {} in {}",
                        r.0,
                        t.out.display()
                    ))
                );
                resume_command(&self.original)
            }
            Some(_) => {
                eprintln!("scaletrain launch: no checkpoint published yet; starting the run again");
                self.original.clone()
            }
            None => self.original.clone(),
        };
        if let Some(t) = &self.train {
            if let Err(e) = append_line(&t.out.join("restarts.jsonl"), &rec) {
                eprintln!("scaletrain launch: warning: could not log the restart: {e:#}");
            }
        }
        self.log.push(rec);
        self.attempt_start = SystemTime::now();
        Ok(Some(command))
    }

    /// "2 restart(s): ranks 1, 0 failed; 14 step(s) and 3.2 s lost".
    pub fn summary(&self) -> String {
        let ranks: Vec<String> = self.log.iter().map(|r| r.failed_rank.to_string()).collect();
        let steps: u64 = self.log.iter().filter_map(|r| r.steps_lost).sum();
        let secs: f64 = self.log.iter().map(|r| r.secs_lost).sum();
        format!(
            "finished after {} restart(s) (failed ranks: {}); at least {steps} step(s) and {secs:.1} s lost{}",
            self.log.len(),
            ranks.join(", "),
            self.train.as_ref().map_or(String::new(), |t| format!(
                "; log: {}",
                t.out.join("restarts.jsonl").display()
            ))
        )
    }
}

fn append_line(path: &Path, rec: &RestartRecord) -> Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    writeln!(f, "{}", serde_json::to_string(rec)?)?;
    f.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn a_train_command_is_recognised_with_its_run_folder() {
        let j =
            TrainJob::detect(&words("/x/scaletrain train --dp 3 --out runs/a --steps 9")).unwrap();
        assert_eq!(j.out, PathBuf::from("runs/a"));
        assert!(!j.resumes);
        let j = TrainJob::detect(&words("scaletrain train --out=r --resume")).unwrap();
        assert_eq!((j.out, j.resumes), (PathBuf::from("r"), true));
        let j = TrainJob::detect(&words("scaletrain train")).unwrap();
        assert_eq!(j.out, PathBuf::from("runs/default"));
        assert!(TrainJob::detect(&words("python train.py --out x")).is_none());
        assert!(TrainJob::detect(&words("scaletrain sample --out x")).is_none());
    }

    #[test]
    fn the_restart_command_resumes_and_never_overwrites() {
        let c = resume_command(&words("st train --overwrite --out r"));
        assert_eq!(c, words("st train --resume --out r"));
        let c = resume_command(&words("st train --resume --out r"));
        assert_eq!(c, words("st train --resume --out r"));
    }

    #[test]
    fn backoff_doubles_up_to_a_cap() {
        let a = RestartArgs {
            max_restarts: 9,
            restart_backoff_secs: 0.5,
        };
        let secs: Vec<f64> = (1..=9).map(|n| a.backoff(n).as_secs_f64()).collect();
        assert_eq!(secs, [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]);
        assert!(RestartArgs {
            max_restarts: 1,
            restart_backoff_secs: f64::NAN
        }
        .check()
        .is_err());
    }
}
