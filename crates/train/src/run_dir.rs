//! The run folder's one owner: `metrics.jsonl` (appended per step, rewound on resume and on a
//! rollback), the files a run starts with (`config.toml`, `tokenizer.json`), leftovers of
//! interrupted writes, pruning of published checkpoints, and the loss plot at the end. The
//! trainer asks it; only the writer rank (data-parallel rank 0 of the first stage) touches
//! files, every other rank's `RunDir` discards what it is given. Checkpoint *contents* (which
//! rank writes which tensors) stay with `crate::checkpoint` and `crate::pipeline`.

use crate::checkpoint::{self, TrainState};
use crate::config::TrainConfig;
use crate::dp::Dp;
use crate::error::{io, TrainError};
use crate::fsutil::write_atomic;
use crate::pipeline::{Pipeline, StageModel};
use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

/// A run folder seen from one rank.
pub struct RunDir {
    out: PathBuf,
    metrics_path: PathBuf,
    /// The open `metrics.jsonl` (writer rank only).
    metrics: Option<BufWriter<File>>,
}

impl RunDir {
    /// Readies `out` for a run that starts at `resume_step` (a resumed run) or from scratch
    /// (`None`), once every check has passed: removes what interrupted writes left behind,
    /// keeps the metrics lines up to the resumed step (or removes the old checkpoints and
    /// metrics), and writes `config.toml` (and the tokenizer). Returns a warning per removed
    /// leftover. Nothing happens on a rank that is not the writer.
    pub fn prepare(
        out: &Path,
        writer: bool,
        resume_step: Option<u64>,
        config_toml: &str,
        tokenizer: Option<&Path>,
    ) -> Result<Vec<String>, TrainError> {
        if !writer {
            return Ok(Vec::new());
        }
        // No rank of this job is writing yet.
        let warnings = checkpoint::remove_leftovers(out)
            .into_iter()
            .map(|name| {
                format!(
                    "removed {name} from {}: left by an interrupted write",
                    out.display()
                )
            })
            .collect();
        let metrics = out.join("metrics.jsonl");
        match resume_step {
            Some(step) => truncate_metrics(&metrics, step)?,
            None => {
                checkpoint::prune(out, 0);
                let _ = std::fs::remove_file(&metrics);
            }
        }
        write_atomic(&out.join("config.toml"), config_toml.as_bytes())?;
        if let Some(tp) = tokenizer {
            let bytes = std::fs::read(tp).map_err(io(tp))?;
            write_atomic(&out.join("tokenizer.json"), &bytes)?;
        }
        Ok(warnings)
    }

    /// Opens `out`'s metrics for appending (the writer rank; others get a `RunDir` that
    /// discards).
    pub fn open(out: &Path, writer: bool) -> Result<RunDir, TrainError> {
        let metrics_path = out.join("metrics.jsonl");
        let metrics = if writer {
            Some(BufWriter::new(append(&metrics_path)?))
        } else {
            None
        };
        Ok(RunDir {
            out: out.to_path_buf(),
            metrics_path,
            metrics,
        })
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.out
    }

    /// Appends one `metrics.jsonl` line.
    pub fn record<T: Serialize + ?Sized>(&mut self, line: &T) -> Result<(), TrainError> {
        if let Some(m) = self.metrics.as_mut() {
            let text = serde_json::to_string(line).expect("metrics lines serialise");
            writeln!(m, "{text}").map_err(io(&self.metrics_path))?;
        }
        Ok(())
    }

    /// Makes every line so far reach the file (before a checkpoint, after an evaluation).
    pub fn flush(&mut self) -> Result<(), TrainError> {
        if let Some(m) = self.metrics.as_mut() {
            m.flush().map_err(io(&self.metrics_path))?;
        }
        Ok(())
    }

    /// Drops the lines of steps after `step` (a rollback to the checkpoint of `step`).
    pub fn rewind(&mut self, step: u64) -> Result<(), TrainError> {
        if self.metrics.is_none() {
            return Ok(());
        }
        self.flush()?;
        self.metrics = None;
        truncate_metrics(&self.metrics_path, step)?;
        self.metrics = Some(BufWriter::new(append(&self.metrics_path)?));
        Ok(())
    }

    /// Writes this rank's part of the checkpoint of `state` (its metrics lines first reach the
    /// file): one process writes everything (`checkpoint::save`); with data parallelism rank 0
    /// writes the weights and, under ZeRO, every rank its optimizer ranges `owned`
    /// (`checkpoint::save_rank`); in a pipeline each stage its tensors
    /// (`crate::pipeline::save_checkpoint`). Returns the published manifest on the rank that
    /// published it, after pruning to the config's `keep_checkpoints`.
    pub fn save_checkpoint(
        &mut self,
        pipe: Option<&mut Pipeline>,
        dp: Option<&mut Dp>,
        (cfg, stage): (&TrainConfig, &StageModel),
        state: &TrainState,
        owned: &[Range<usize>],
    ) -> Result<Option<PathBuf>, TrainError> {
        self.flush()?;
        let out = &self.out;
        let layout = &stage.chunks[0].1;
        let (dp_rank, dp_size, zero_stage) = dp
            .as_ref()
            .map_or((0, 1, 0), |d| (d.rank(), d.size(), d.zero().number()));
        let saved = match (pipe, dp) {
            (Some(p), _) => crate::pipeline::save_checkpoint(
                p,
                out,
                cfg,
                stage,
                state,
                (dp_rank, dp_size, zero_stage),
                owned,
            )?,
            (None, Some(d)) => {
                let part = checkpoint::RankPart {
                    rank: dp_rank,
                    dp_size,
                    zero_stage,
                    ranges: owned,
                };
                checkpoint::save_rank(out, cfg, layout, state, &part, &mut |b| {
                    d.all_gather_bytes(b, "checkpoint: telling the ranks what each wrote")
                })?
            }
            (None, None) => Some(checkpoint::save(out, cfg, layout, state)?),
        };
        if saved.is_some() {
            checkpoint::prune(out, cfg.train.keep_checkpoints);
        }
        Ok(saved)
    }

    /// End of the run: the metrics reach the file and `loss.svg` is drawn from them.
    pub fn finish(mut self, loss_floor: Option<f64>) -> Result<(), TrainError> {
        self.flush()?;
        if self.metrics.take().is_some() {
            if let Ok(text) = std::fs::read_to_string(&self.metrics_path) {
                let svg = crate::plot::loss_svg(&text, loss_floor);
                write_atomic(&self.out.join("loss.svg"), svg.as_bytes())?;
            }
        }
        Ok(())
    }
}

fn append(path: &Path) -> Result<File, TrainError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io(path))
}

/// Keeps the metrics lines of steps ≤ `step` (a resumed run rewrites what came after its
/// checkpoint).
fn truncate_metrics(path: &Path, step: u64) -> Result<(), TrainError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(_) => return Ok(()),
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    write_atomic(path, kept.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("st-rundir-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn lines_rewind_and_only_the_writer_writes() {
        let d = tmp("rewind");
        RunDir::prepare(&d, true, None, "x = 1\n", None).unwrap();
        assert_eq!(
            std::fs::read_to_string(d.join("config.toml")).unwrap(),
            "x = 1\n"
        );
        let mut r = RunDir::open(&d, true).unwrap();
        let mut other = RunDir::open(&d, false).unwrap();
        for s in 1..=4u64 {
            r.record(&serde_json::json!({"step": s, "loss": 1.0}))
                .unwrap();
            other
                .record(&serde_json::json!({"step": s, "loss": 9.0}))
                .unwrap();
        }
        r.rewind(2).unwrap();
        r.record(&serde_json::json!({"step": 3, "loss": 2.0}))
            .unwrap();
        r.finish(None).unwrap();
        other.finish(None).unwrap();
        let text = std::fs::read_to_string(d.join("metrics.jsonl")).unwrap();
        let steps: Vec<u64> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(steps, [1, 2, 3], "{text}");
        assert!(!text.contains("9.0"), "a non-writer rank wrote: {text}");
        assert!(d.join("loss.svg").exists());
        // A resume keeps the lines up to its step; a fresh start removes them.
        RunDir::prepare(&d, true, Some(1), "x = 1\n", None).unwrap();
        assert_eq!(
            std::fs::read_to_string(d.join("metrics.jsonl"))
                .unwrap()
                .lines()
                .count(),
            1
        );
        RunDir::prepare(&d, true, None, "x = 1\n", None).unwrap();
        assert!(!d.join("metrics.jsonl").exists());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
