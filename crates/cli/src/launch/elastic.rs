//! Elastic resize: `launch --nproc-per-node MIN:MAX` (torchrun's form) with `--max-restarts N`.
//!
//! The job has MAX **slots** (places a rank can run; on one machine, process slots 0..MAX). It
//! starts with a rank in every slot. When a rank fails, its slot is marked **down** (the file
//! `OUT/elastic/slot-S.down` says why) and the job restarts (a restart of `--max-restarts`) from
//! the newest checkpoint with one rank per healthy slot: fewer data-parallel ranks. The global
//! batch stays the same: every attempt gets `--set train.grad_accum = G / ranks`, where G (in
//! micro-batches) is MAX × the command's own `grad_accum`; sizes that G does not divide are
//! skipped, and a MIN:MAX range with such sizes is refused at the start with the fix.
//!
//! A slot **comes back** when its `.down` file is removed (by an operator, a health check or a
//! test); creating one takes a running slot out (a drain). The launcher looks every 100 ms; when
//! the healthy slots call for another size, it makes a checkpoint boundary: it sends every rank
//! SIGINT, the ranks agree on the step to stop at, write a checkpoint and exit 0 (the trainer's
//! Ctrl-C path), and the job starts again at the new size with `--resume`. Such a resize is not a
//! failure and does not count against `--max-restarts`.
//!
//! Every resize is a line of `OUT/elastic.jsonl` (from, to, the step it continues from, why);
//! the job ends with the steps that ran at each size, on stderr and as the last line there.
//! A failure when no smaller size is allowed (MIN ranks already, or none that keeps the global
//! batch) brings the failed slot back at once: the job restarts at the same size, as plain
//! `--max-restarts` would.

use super::nproc::{command_at, flag_value, gcd, grad_accum_of, NprocPerNode};
use super::{restart, LaunchArgs, Outcome};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// What an elastic job needs, checked before anything starts.
#[derive(Debug, Clone)]
pub struct Elastic {
    /// MIN and MAX.
    pub n: NprocPerNode,
    /// The global batch in micro-batches, when the launcher keeps it through `grad_accum`
    /// (`None`: the command gives `--global-batch`, which the trainer keeps at any size).
    pub global_micro_batches: Option<u64>,
    /// The run folder.
    pub out: PathBuf,
}

/// Refuses what elastic resize does not handle, naming the fix.
pub fn check(a: &LaunchArgs, r: &restart::RestartArgs) -> Result<Elastic> {
    let n = a.nproc_per_node;
    let form = format!("--nproc-per-node {n}");
    if a.nnodes != 1 {
        bail!("{form}: elastic resize is for one node (--nnodes 1); give a fixed count with --nnodes {}", a.nnodes);
    }
    if a.servers > 0 {
        bail!("{form}: elastic resize is for all-reduce data parallelism, not parameter servers (--servers {}); drop --servers or give a fixed count", a.servers);
    }
    if r.max_restarts == 0 {
        bail!("{form}: a resize restarts the job, so it needs --max-restarts N (N ≥ 1: how many failures to survive)");
    }
    let Some(job) = restart::TrainJob::detect(&a.command) else {
        bail!("{form}: elastic resize continues a training run (scaletrain train) from its checkpoints; for another command give a fixed count");
    };
    for f in ["--pp", "--tp"] {
        if flag_value(&a.command, f).is_some_and(|v| v.trim() != "1") {
            bail!("{form}: elastic resize changes the data-parallel size only; {f} > 1 is not supported (give a fixed count)");
        }
    }
    let g = if flag_value(&a.command, "--global-batch").is_some() {
        None
    } else {
        let k = grad_accum_of(&a.command)?;
        let g = n.max as u64 * k;
        let bad: Vec<usize> = (n.min..=n.max)
            .filter(|s| !g.is_multiple_of(*s as u64))
            .collect();
        if !bad.is_empty() {
            let l = (n.min..=n.max).fold(1u64, |l, s| l / gcd(l, s as u64) * s as u64);
            let k_fix = l / gcd(l, n.max as u64);
            bail!(
                "{form}: the global batch of {g} micro-batches ({} ranks × train.grad_accum {k}) \
                 does not split evenly over {bad:?} rank(s); with --set train.grad_accum={k_fix} \
                 ({} micro-batches) every size from {} to {} keeps it",
                n.max,
                n.max as u64 * k_fix,
                n.min,
                n.max
            );
        }
        Some(g)
    };
    Ok(Elastic {
        n,
        global_micro_batches: g,
        out: job.out,
    })
}

/// The slots and their `.down` files.
pub struct Slots {
    dir: PathBuf,
    max: usize,
}

impl Slots {
    /// The slots of the run folder `out`; `.down` files left by an earlier launch are removed
    /// (a new launch starts with every slot) and named in the returned notes.
    pub fn new(out: &Path, max: usize) -> (Slots, Vec<String>) {
        let s = Slots {
            dir: out.join("elastic"),
            max,
        };
        let mut notes = Vec::new();
        for slot in 0..max {
            let p = s.file(slot);
            if p.exists() && std::fs::remove_file(&p).is_ok() {
                notes.push(format!(
                    "removed {} (left by an earlier launch)",
                    p.display()
                ));
            }
        }
        (s, notes)
    }

    /// The file that marks `slot` down.
    pub fn file(&self, slot: usize) -> PathBuf {
        self.dir.join(format!("slot-{slot}.down"))
    }

    /// The healthy slots, in order.
    pub fn healthy(&self) -> Vec<usize> {
        (0..self.max).filter(|s| !self.file(*s).exists()).collect()
    }

    /// Marks `slot` down, writing `why` into its file.
    pub fn mark_down(&self, slot: usize, why: &str) -> Result<()> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        let p = self.file(slot);
        std::fs::write(
            &p,
            format!(
                "{why}\nremove this file when slot {slot} is healthy again: the job grows back\n"
            ),
        )
        .with_context(|| format!("writing {}", p.display()))
    }

    /// Brings `slot` back (removes its file).
    pub fn bring_back(&self, slot: usize) {
        let _ = std::fs::remove_file(self.file(slot));
    }
}

/// The size to run at with `healthy` slots: the largest in MIN..=healthy that keeps the global
/// batch (`None`: none).
pub fn size_for(e: &Elastic, healthy: usize) -> Option<usize> {
    (e.n.min..=healthy.min(e.n.max))
        .rev()
        .find(|s| e.global_micro_batches.is_none_or(|g| g % *s as u64 == 0))
}

/// One resize, as logged (a line of `elastic.jsonl`).
#[derive(Debug, Clone, Serialize)]
pub struct ResizeRecord {
    /// `shrink` or `grow`.
    pub event: &'static str,
    /// Ranks before.
    pub from: usize,
    /// Ranks after.
    pub to: usize,
    /// The checkpoint the job continues from (`null`: none yet, it starts again).
    pub resume_step: Option<u64>,
    /// Why.
    pub reason: String,
    /// Slots down after it.
    pub down_slots: Vec<usize>,
    /// The global batch in micro-batches, kept (`null`: kept by the command's --global-batch).
    pub global_micro_batches: Option<u64>,
    /// When (seconds since the Unix epoch).
    pub unix_secs: f64,
    /// Seconds since the launch began.
    pub secs_into_launch: f64,
}

fn append(path: &Path, v: &impl Serialize) -> Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    writeln!(f, "{}", serde_json::to_string(v)?)?;
    f.sync_all()?;
    Ok(())
}

/// The newest published checkpoint's step in `out` (0: none).
fn newest_step(out: &Path) -> u64 {
    train::checkpoint::list(out).first().map_or(0, |(s, _)| *s)
}

/// "steps 1–40 at 3 ranks, 41–300 at 2 ranks" from (size, first step − 1) per attempt and the
/// final step; consecutive attempts at one size are merged.
pub fn steps_at_sizes(segments: &[(usize, u64)], end: u64) -> Vec<(usize, u64, u64)> {
    let mut out: Vec<(usize, u64, u64)> = Vec::new();
    for (i, &(size, from)) in segments.iter().enumerate() {
        let to = segments.get(i + 1).map_or(end, |s| s.1);
        if to <= from {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.0 == size && last.2 == from => last.2 = to,
            _ => out.push((size, from, to)),
        }
    }
    out
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Runs an elastic job (see the module docs).
pub fn run(a: &LaunchArgs, r: &restart::RestartArgs) -> Result<()> {
    let e = check(a, r)?;
    super::install_signal_handlers();
    let (slots, notes) = Slots::new(&e.out, e.n.max);
    for n in notes {
        eprintln!("scaletrain launch: {n}");
    }
    let log = e.out.join("elastic.jsonl");
    let clock = Instant::now();
    let mut sup = restart::Supervisor::new(&a.command, r);
    let mut command = a.command.clone();
    let mut size = e.n.max;
    let mut segments: Vec<(usize, u64)> = Vec::new();
    loop {
        let resumes = command.iter().any(|w| w == "--resume");
        let start = if resumes { newest_step(&e.out) } else { 0 };
        let active: Vec<usize> = slots.healthy().into_iter().take(size).collect();
        let mut job = a.clone();
        job.nproc_per_node = NprocPerNode::fixed(size);
        job.command = command_at(&command, size, e.global_micro_batches);
        eprintln!(
            "scaletrain launch: elastic {}: {size} rank(s) in slot(s) {active:?}",
            e.n
        );
        let mut last_look = Instant::now();
        let mut watch = || {
            if last_look.elapsed().as_millis() < 100 {
                return false;
            }
            last_look = Instant::now();
            size_for(&e, slots.healthy().len()).is_some_and(|s| s != size)
        };
        let outcome = super::attempt(&job, sup.restarts(), r.max_restarts, Some(&mut watch))?;
        segments.push((size, start));
        match &outcome {
            Outcome::Paused => {
                let to = size_for(&e, slots.healthy().len()).unwrap_or(size);
                let resume = newest_step(&e.out);
                let rec = ResizeRecord {
                    event: if to > size { "grow" } else { "shrink" },
                    from: size,
                    to,
                    resume_step: Some(resume),
                    reason: if to > size {
                        "slot(s) came back (their .down files were removed)".into()
                    } else {
                        "slot(s) were marked down (.down files appeared)".into()
                    },
                    down_slots: (0..e.n.max).filter(|s| slots.file(*s).exists()).collect(),
                    global_micro_batches: e.global_micro_batches,
                    unix_secs: unix_now(),
                    secs_into_launch: clock.elapsed().as_secs_f64(),
                };
                eprintln!(
                    "scaletrain launch: elastic: {} from {size} to {to} rank(s) at the checkpoint of step {resume}: {}",
                    rec.event, rec.reason
                );
                append(&log, &rec).context("logging the resize")?;
                size = to;
                command = restart::resume_command(&a.command);
            }
            Outcome::Failed { rank, how, .. } => {
                let slot = active.get(*rank).copied();
                let why = format!("rank {rank} {how}");
                if let Some(slot) = slot {
                    slots.mark_down(slot, &why)?;
                }
                let to = match size_for(&e, slots.healthy().len()) {
                    Some(s) => s,
                    None => {
                        // No smaller size allowed: the slot is tried again.
                        if let Some(slot) = slot {
                            slots.bring_back(slot);
                        }
                        size
                    }
                };
                let next = sup.next(&outcome)?;
                command = next.context("a failed attempt always restarts or gives up")?;
                if to != size {
                    let rec = ResizeRecord {
                        event: "shrink",
                        from: size,
                        to,
                        resume_step: command
                            .iter()
                            .any(|w| w == "--resume")
                            .then(|| newest_step(&e.out)),
                        reason: format!(
                            "{why}; slot {} is down (remove {} when it is back)",
                            slot.map_or("?".into(), |s| s.to_string()),
                            slot.map_or(String::new(), |s| slots.file(s).display().to_string())
                        ),
                        down_slots: (0..e.n.max).filter(|s| slots.file(*s).exists()).collect(),
                        global_micro_batches: e.global_micro_batches,
                        unix_secs: unix_now(),
                        secs_into_launch: clock.elapsed().as_secs_f64(),
                    };
                    eprintln!(
                        "scaletrain launch: elastic: shrink from {size} to {to} rank(s): {}",
                        rec.reason
                    );
                    append(&log, &rec).context("logging the resize")?;
                }
                size = to;
            }
            Outcome::Done | Outcome::Interrupted { .. } => {
                sup.next(&outcome)?;
                let end = newest_step(&e.out);
                let spans = steps_at_sizes(&segments, end);
                let text: Vec<String> = spans
                    .iter()
                    .map(|(s, a, b)| format!("steps {}–{b} at {s} rank(s)", a + 1))
                    .collect();
                let resizes = segments.windows(2).filter(|w| w[0].0 != w[1].0).count();
                eprintln!(
                    "scaletrain launch: elastic: {}; {resizes} resize(s){}; log: {}",
                    text.join(", "),
                    e.global_micro_batches.map_or(String::new(), |g| format!(
                        "; global batch {g} micro-batches throughout"
                    )),
                    log.display()
                );
                #[derive(Serialize)]
                struct Span {
                    ranks: usize,
                    first_step: u64,
                    last_step: u64,
                    steps: u64,
                }
                let spans: Vec<Span> = spans
                    .iter()
                    .map(|&(ranks, a, b)| Span {
                        ranks,
                        first_step: a + 1,
                        last_step: b,
                        steps: b - a,
                    })
                    .collect();
                append(
                    &log,
                    &serde_json::json!({
                        "event": "end",
                        "final_step": end,
                        "steps_at_size": spans,
                        "resizes": resizes,
                        "global_micro_batches": e.global_micro_batches,
                        "unix_secs": unix_now(),
                        "secs_into_launch": clock.elapsed().as_secs_f64(),
                    }),
                )
                .context("logging the end of the elastic job")?;
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn sizes_that_cannot_keep_the_global_batch_are_refused_or_skipped() {
        let exe = std::env::current_exe().unwrap().display().to_string();
        let mut a = LaunchArgs {
            nproc_per_node: "2:3".parse().unwrap(),
            nnodes: 1,
            node_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: None,
            servers: 0,
            transport: None,
            token: None,
            grace_secs: 1.0,
            command: words(&format!("{exe} train --dp 3 --out r")),
        };
        a.command[0] = "scaletrain".into();
        let r = restart::RestartArgs {
            max_restarts: 1,
            restart_backoff_secs: 0.0,
        };
        let e = check(&a, &r).unwrap_err().to_string();
        assert!(e.contains("[2]") && e.contains("train.grad_accum=2"), "{e}");
        a.command.extend(words("--set train.grad_accum=2"));
        let e = check(&a, &r).unwrap();
        assert_eq!(e.global_micro_batches, Some(6));
        assert_eq!(size_for(&e, 3), Some(3));
        assert_eq!(size_for(&e, 2), Some(2));
        assert_eq!(size_for(&e, 1), None);
        let wide = Elastic {
            n: "1:4".parse().unwrap(),
            global_micro_batches: Some(4),
            out: "r".into(),
        };
        // 3 healthy slots: 3 does not divide 4, so 2 ranks.
        assert_eq!(size_for(&wide, 3), Some(2));
        let no_restarts = restart::RestartArgs::default();
        assert!(check(&a, &no_restarts)
            .unwrap_err()
            .to_string()
            .contains("--max-restarts"));
    }

    #[test]
    fn steps_are_counted_per_size() {
        // 3 ranks from 0, failure resumed at 40 with 2, grown back at 120, finished at 300.
        let s = steps_at_sizes(&[(3, 0), (2, 40), (3, 120)], 300);
        assert_eq!(s, [(3, 0, 40), (2, 40, 120), (3, 120, 300)]);
        // A restart at the same size merges.
        let s = steps_at_sizes(&[(3, 0), (3, 40), (2, 60)], 100);
        assert_eq!(s, [(3, 0, 60), (2, 60, 100)]);
    }
}
