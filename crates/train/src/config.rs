//! The training configuration: TOML sections `[model]`, `[data]`, `[optim]`, `[train]`, every
//! field with a default, plus `key=value` overrides from the command line. Parsing is strict:
//! unknown keys and wrong types are errors that name the dotted field.
//!
//! `RawConfig` (what the user wrote, `vocab_size` and `decay_steps` possibly left to be
//! inferred) is resolved into the same type with those filled in once the data is known; the
//! run folder keeps a copy of the resolved one (`config.toml`).

use crate::error::TrainError;
use crate::guard::{GuardConfig, SpikeAction};
use crate::loss_scale::LossScaleConfig;
use crate::synthetic::SyntheticSpec;
pub use plan::recipe::{Precision, Recompute};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The whole training configuration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// GPT-2 shape.
    pub model: ModelSection,
    /// Where tokens come from.
    pub data: DataSection,
    /// AdamW and the learning-rate schedule.
    pub optim: OptimSection,
    /// Loop length, batch, evaluation, checkpoints, precision, recomputation.
    pub train: LoopSection,
    /// Stability guards and the fp16 loss scale.
    pub stability: StabilitySection,
}

/// `[model]`: the GPT-2 shape.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// Transformer blocks (default 2).
    pub n_layer: usize,
    /// Attention heads; must divide `channels` (default 4).
    pub n_head: usize,
    /// Model width (default 128).
    pub channels: usize,
    /// Training sequence length, also the position-embedding size (default 64).
    pub seq_len: usize,
    /// Vocabulary size; unset = the data's (token-file header or synthetic `vocab_size`).
    /// When set it must equal the data's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vocab_size: Option<usize>,
}

impl Default for ModelSection {
    fn default() -> Self {
        ModelSection {
            n_layer: 2,
            n_head: 4,
            channels: 128,
            seq_len: 64,
            vocab_size: None,
        }
    }
}

/// Data source kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataSource {
    /// The built-in Markov corpus (`[data.synthetic]`), generated in memory.
    #[default]
    Synthetic,
    /// Token files written by `scaletrain data prepare` (`train_file`, `val_file`).
    Files,
}

/// `[data]`: where tokens come from.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    /// `"synthetic"` (default) or `"files"`.
    pub source: DataSource,
    /// Training token file (`source = "files"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub train_file: Option<PathBuf>,
    /// Validation token file (`source = "files"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_file: Option<PathBuf>,
    /// `tokenizer.json` the token files were made with; its vocabulary must match the model's
    /// (optional; `sample` uses it to print text).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<PathBuf>,
    /// The synthetic corpus (`source = "synthetic"`).
    pub synthetic: SyntheticSpec,
}

/// `[optim]`: AdamW and the warmup + cosine schedule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimSection {
    /// Peak learning rate, reached after warmup (default 5e-3).
    pub lr: f32,
    /// Final learning rate of the cosine decay (default 5e-4).
    pub min_lr: f32,
    /// Linear warmup steps from lr/warmup to lr (default 50).
    pub warmup_steps: u64,
    /// Step at which the cosine reaches `min_lr`; unset = `train.steps` (default unset).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decay_steps: Option<u64>,
    /// Decoupled weight decay on 2-D tensors (default 0.1).
    pub weight_decay: f32,
    /// AdamW β1 (default 0.9).
    pub beta1: f32,
    /// AdamW β2 (default 0.95).
    pub beta2: f32,
    /// AdamW ε (default 1e-8).
    pub eps: f32,
    /// Clip the global gradient norm to this; 0 disables clipping (default 1.0).
    pub grad_clip: f32,
}

impl Default for OptimSection {
    fn default() -> Self {
        OptimSection {
            lr: 5e-3,
            min_lr: 5e-4,
            warmup_steps: 50,
            decay_steps: None,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
        }
    }
}

/// `[train]`: loop length, batch, evaluation, checkpoints, threads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoopSection {
    /// Optimizer steps in the whole run (default 1200).
    pub steps: u64,
    /// Sequences per micro-batch (default 16).
    pub batch_size: usize,
    /// Micro-batches accumulated per optimizer step (default 1).
    pub grad_accum: usize,
    /// Seed of the initial weights and of the batch order (default 1337).
    pub seed: u64,
    /// Kernel threads; 0 = all cores (default 0).
    pub threads: usize,
    /// Validation loss every this many steps, and at the end; 0 = only at the end (default 200).
    pub eval_every: u64,
    /// Validation batches per evaluation (default 16).
    pub eval_batches: usize,
    /// Checkpoint every this many steps, and at the end; 0 = only at the end (default 400).
    pub checkpoint_every: u64,
    /// Newest checkpoints kept in the run folder; older ones are deleted (default 2).
    pub keep_checkpoints: usize,
    /// Stop when the validation loss has not improved for this many evaluations; 0 = never
    /// (default 0).
    pub patience: u64,
    /// Minimum decrease of the validation loss that counts as an improvement (default 1e-3).
    pub min_delta: f64,
    /// Storage precision (the estimator's names): `"fp32"` (default), `"bf16-mixed"` or
    /// `"fp16-mixed"`. Mixed precision keeps fp32 master weights and AdamW state, a 16-bit
    /// working copy of the weights, 16-bit activations and per-micro-batch gradients, and
    /// hands f32 gradients to the reduction and the optimizer; fp16 adds the dynamic loss
    /// scale (`[stability]`).
    pub precision: Precision,
    /// Activation recomputation (Korthikanti et al. 2022's names): `"none"` (default),
    /// `"selective"` (the attention softmax) or `"full"` (whole layers). Changes memory and
    /// time, never the result (bitwise in fp32).
    pub recompute: Recompute,
    /// Data parallel: a rank whose busy time per step (median over `straggler_window` steps)
    /// is more than this fraction above the median rank's is named a straggler (default 0.2;
    /// `crate::straggler`).
    pub straggler_margin: f64,
    /// Steps the straggler medians are taken over; 0 turns detection off (default 20).
    pub straggler_window: usize,
}

impl Default for LoopSection {
    fn default() -> Self {
        LoopSection {
            steps: 1200,
            batch_size: 16,
            grad_accum: 1,
            seed: 1337,
            threads: 0,
            eval_every: 200,
            eval_batches: 16,
            checkpoint_every: 400,
            keep_checkpoints: 2,
            patience: 0,
            min_delta: 1e-3,
            precision: Precision::Fp32,
            recompute: Recompute::None,
            straggler_margin: 0.2,
            straggler_window: 20,
        }
    }
}

/// `[stability]`: what happens to non-finite steps and loss spikes (`crate::guard`), and the
/// fp16 dynamic loss scale (`crate::loss_scale`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StabilitySection {
    /// Stop with an error after this many steps in a row whose loss or gradients were not
    /// finite (each is skipped: it never reaches the weights) (default 5).
    pub max_bad_steps: u32,
    /// What a loss spike does: `"log"` (default), `"skip"` (drop the batch's update) or
    /// `"rollback"` (restore the last checkpoint and skip the data since).
    pub spike_action: SpikeAction,
    /// A loss above `mean + spike_margin · std` of the running statistic is a spike
    /// (default 6).
    pub spike_margin: f64,
    /// Weight of the newest step in the running mean and variance (default 0.02: about 50
    /// steps).
    pub spike_ema: f64,
    /// Applied steps before spikes are judged (default 20).
    pub spike_warmup: u32,
    /// fp16: the initial loss scale (default 65536 = 2^16).
    pub loss_scale_init: f32,
    /// fp16: clean steps in a row before the scale doubles (default 2000).
    pub loss_scale_growth_interval: u32,
    /// Fault injection for tests and drills: at these (1-based) steps the last data-parallel
    /// rank's loss gradient is NaN, so every gradient of the step is (default none).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub inject_nan_steps: Vec<u64>,
    /// Fault injection: at these steps every micro-batch's targets are replaced by a shifted
    /// copy (a corrupt batch whose loss spikes) (default none).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub inject_bad_batch_steps: Vec<u64>,
}

impl Default for StabilitySection {
    fn default() -> Self {
        let g = GuardConfig::default();
        let l = LossScaleConfig::default();
        StabilitySection {
            max_bad_steps: g.max_bad_in_a_row,
            spike_action: g.spike_action,
            spike_margin: g.spike_margin,
            spike_ema: g.ema_weight,
            spike_warmup: g.warmup,
            loss_scale_init: l.init,
            loss_scale_growth_interval: l.growth_interval,
            inject_nan_steps: Vec::new(),
            inject_bad_batch_steps: Vec::new(),
        }
    }
}

impl StabilitySection {
    /// The guard's settings.
    pub fn guard(&self) -> GuardConfig {
        GuardConfig {
            max_bad_in_a_row: self.max_bad_steps,
            spike_margin: self.spike_margin,
            ema_weight: self.spike_ema,
            warmup: self.spike_warmup,
            spike_action: self.spike_action,
        }
    }

    /// The loss scale's settings.
    pub fn loss_scale(&self) -> LossScaleConfig {
        LossScaleConfig {
            init: self.loss_scale_init,
            growth_interval: self.loss_scale_growth_interval,
            ..LossScaleConfig::default()
        }
    }
}

/// Fields that may differ between a checkpoint and the run resuming it: they change how long
/// the run is or how often it reports, not what one step computes. Everything else must match.
pub const RESUME_MAY_CHANGE: &[&str] = &[
    "train.steps",
    "train.threads",
    "train.eval_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.patience",
    "train.min_delta",
    "train.recompute",
    "train.straggler_margin",
    "train.straggler_window",
    "stability.max_bad_steps",
    "stability.spike_action",
    "stability.spike_margin",
    "stability.spike_ema",
    "stability.spike_warmup",
    "stability.inject_nan_steps",
    "stability.inject_bad_batch_steps",
];

fn config_err(origin: &str, field: impl Into<String>, reason: impl Into<String>) -> TrainError {
    TrainError::Config {
        origin: origin.to_string(),
        field: field.into(),
        reason: reason.into(),
    }
}

/// Parses one `key=value` override (`optim.lr=1e-3`, `data.source="files"`) into `table`.
/// The value is read as a TOML value; if that fails, as a bare string.
pub fn apply_override(table: &mut toml::Table, assignment: &str) -> Result<(), TrainError> {
    let origin = "command line";
    let (key, value) = assignment.split_once('=').ok_or_else(|| {
        config_err(
            origin,
            assignment,
            "an override must look like section.key=value",
        )
    })?;
    let key = key.trim();
    let parsed: toml::Value = match toml::from_str::<toml::Table>(&format!("v = {}", value.trim()))
    {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or(toml::Value::String(value.to_string())),
        Err(_) => toml::Value::String(value.trim().to_string()),
    };
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(config_err(origin, key, "empty key segment"));
    }
    let mut cur = table;
    for p in &parts[..parts.len() - 1] {
        let entry = cur
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = match entry {
            toml::Value::Table(t) => t,
            _ => return Err(config_err(origin, key, format!("`{p}` is not a section"))),
        };
    }
    cur.insert(parts[parts.len() - 1].to_string(), parsed);
    Ok(())
}

impl TrainConfig {
    /// Reads `path` (if given), applies `overrides`, and checks every field.
    pub fn load(
        path: Option<&std::path::Path>,
        overrides: &[String],
    ) -> Result<TrainConfig, TrainError> {
        let (mut table, origin) = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(crate::error::io(p))?;
                let t: toml::Table = toml::from_str(&text).map_err(|e| {
                    config_err(
                        &p.display().to_string(),
                        "(syntax)",
                        e.message().to_string(),
                    )
                })?;
                (t, p.display().to_string())
            }
            None => (toml::Table::new(), "defaults".to_string()),
        };
        for o in overrides {
            apply_override(&mut table, o)?;
        }
        let origin = if overrides.is_empty() {
            origin
        } else {
            format!("{origin} + command line")
        };
        let cfg = Self::from_table(table, &origin)?;
        cfg.check(&origin)?;
        Ok(cfg)
    }

    /// Deserialises a table, naming the dotted path of the first bad field.
    pub fn from_table(table: toml::Table, origin: &str) -> Result<TrainConfig, TrainError> {
        serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
            let path = e.path().to_string();
            // toml appends "in `section`" on later lines; the dotted path already says it.
            let msg = e.into_inner().to_string();
            let first = msg.lines().next().unwrap_or_default().to_string();
            config_err(origin, path, first)
        })
    }

    /// Range checks that serde cannot express.
    pub fn check(&self, origin: &str) -> Result<(), TrainError> {
        let bad = |f: &str, r: String| Err(config_err(origin, f, r));
        let m = &self.model;
        for (f, v) in [
            ("model.n_layer", m.n_layer),
            ("model.n_head", m.n_head),
            ("model.channels", m.channels),
            ("model.seq_len", m.seq_len),
            ("train.batch_size", self.train.batch_size),
            ("train.grad_accum", self.train.grad_accum),
            ("train.eval_batches", self.train.eval_batches),
            ("train.keep_checkpoints", self.train.keep_checkpoints),
        ] {
            if v == 0 {
                return bad(f, "must be at least 1".into());
            }
        }
        if !m.channels.is_multiple_of(m.n_head) {
            return bad(
                "model.n_head",
                format!(
                    "channels ({}) % n_head ({}) = {}, must be 0",
                    m.channels,
                    m.n_head,
                    m.channels % m.n_head
                ),
            );
        }
        if self.train.steps == 0 {
            return bad("train.steps", "must be at least 1".into());
        }
        let o = &self.optim;
        for (f, v) in [("optim.lr", o.lr), ("optim.min_lr", o.min_lr)] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(f, format!("{v} must be a finite number >= 0"));
            }
        }
        if o.min_lr > o.lr {
            return bad(
                "optim.min_lr",
                format!("{} exceeds optim.lr ({})", o.min_lr, o.lr),
            );
        }
        for (f, v) in [("optim.beta1", o.beta1), ("optim.beta2", o.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return bad(f, format!("{v} is not in [0, 1)"));
            }
        }
        if !(o.eps > 0.0 && o.eps.is_finite()) {
            return bad("optim.eps", format!("{} must be > 0", o.eps));
        }
        if !(o.weight_decay >= 0.0 && o.weight_decay.is_finite()) {
            return bad(
                "optim.weight_decay",
                format!("{} must be >= 0", o.weight_decay),
            );
        }
        if !(o.grad_clip >= 0.0 && o.grad_clip.is_finite()) {
            return bad("optim.grad_clip", format!("{} must be >= 0", o.grad_clip));
        }
        let m = self.train.straggler_margin;
        if !(m > 0.0 && m.is_finite()) {
            return bad(
                "train.straggler_margin",
                format!("{m} must be a finite number > 0 (0.2: 20% slower than the median rank)"),
            );
        }
        let st = &self.stability;
        if st.max_bad_steps == 0 {
            return bad("stability.max_bad_steps", "must be at least 1".into());
        }
        if !(st.spike_margin > 0.0 && st.spike_margin.is_finite()) {
            return bad(
                "stability.spike_margin",
                format!("{} must be a finite number > 0", st.spike_margin),
            );
        }
        if !(st.spike_ema > 0.0 && st.spike_ema <= 1.0) {
            return bad(
                "stability.spike_ema",
                format!("{} is not in (0, 1]", st.spike_ema),
            );
        }
        if !(st.loss_scale_init >= 1.0 && st.loss_scale_init <= LossScaleConfig::default().max) {
            return bad(
                "stability.loss_scale_init",
                format!(
                    "{} is not in [1, 2^24]; 65536 is the usual start",
                    st.loss_scale_init
                ),
            );
        }
        if st.loss_scale_growth_interval == 0 {
            return bad(
                "stability.loss_scale_growth_interval",
                "must be at least 1".into(),
            );
        }
        match self.data.source {
            DataSource::Synthetic => {
                if let Err((f, r)) = self.data.synthetic.check() {
                    return bad(&format!("data.synthetic.{f}"), r);
                }
            }
            DataSource::Files => {
                if self.data.train_file.is_none() {
                    return bad(
                        "data.train_file",
                        "required when data.source = \"files\"".into(),
                    );
                }
                if self.data.val_file.is_none() {
                    return bad(
                        "data.val_file",
                        "required when data.source = \"files\"".into(),
                    );
                }
            }
        }
        Ok(())
    }

    /// The step at which the cosine schedule reaches `min_lr`.
    pub fn decay_steps(&self) -> u64 {
        self.optim.decay_steps.unwrap_or(self.train.steps)
    }

    /// TOML text of this config.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# could not serialise: {e}\n"))
    }

    /// Fields (dotted) whose values differ from `other`, except those in `allowed`, as
    /// `field: a vs b` lines.
    pub fn differences(&self, other: &TrainConfig, allowed: &[&str]) -> Vec<String> {
        let flat = |c: &TrainConfig| {
            let mut out = std::collections::BTreeMap::new();
            if let Ok(v) = toml::Value::try_from(c) {
                flatten("", &v, &mut out);
            }
            out
        };
        let (a, b) = (flat(self), flat(other));
        let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
        keys.into_iter()
            .filter(|k| !allowed.contains(&k.as_str()))
            .filter_map(|k| {
                let (x, y) = (a.get(k), b.get(k));
                (x != y).then(|| {
                    format!(
                        "{k}: {} vs {}",
                        x.map_or("unset".into(), |v| v.to_string()),
                        y.map_or("unset".into(), |v| v.to_string())
                    )
                })
            })
            .collect()
    }
}

fn flatten(
    prefix: &str,
    v: &toml::Value,
    out: &mut std::collections::BTreeMap<String, toml::Value>,
) {
    match v {
        toml::Value::Table(t) => {
            for (k, x) in t {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, x, out);
            }
        }
        _ => {
            out.insert(prefix.to_string(), v.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(text: &str, overrides: &[&str]) -> Result<TrainConfig, TrainError> {
        let d = std::env::temp_dir().join(format!("st-config-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join(format!("c{}.toml", text.len()));
        std::fs::write(&p, text).unwrap();
        let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        TrainConfig::load(Some(&p), &o)
    }

    #[test]
    fn defaults_are_valid_and_roundtrip() {
        let c = TrainConfig::load(None, &[]).unwrap();
        assert_eq!(c, TrainConfig::default());
        let back: TrainConfig = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn unknown_keys_and_wrong_types_name_the_field() {
        let e = load_text("[optim]\nlr = 1e-3\nlearning_rate = 2\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("optim.learning_rate")
                || (e.contains("optim") && e.contains("learning_rate")),
            "{e}"
        );
        assert!(e.contains("unknown field"), "{e}");
        let e = load_text("[train]\nsteps = \"ten\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("train.steps") && e.contains("invalid type"),
            "{e}"
        );
        let e = load_text("[modle]\nn_layer = 2\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("modle"), "{e}");
        let e = load_text("[model]\nchannels = 100\nn_head = 3\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("model.n_head") && e.contains("% n_head (3) = 1"),
            "{e}"
        );
        let e = load_text("", &["train.batch_size=-1"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("train.batch_size") && e.contains("command line"),
            "{e}"
        );
        let e = load_text("[data]\nsource = \"files\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("data.train_file"), "{e}");
        let e = load_text("[model\n", &[]).unwrap_err().to_string();
        assert!(e.contains(".toml"), "{e}");
    }

    #[test]
    fn overrides_are_typed_and_win() {
        let c = load_text(
            "[optim]\nlr = 1e-3\n",
            &["optim.lr=5e-4", "train.steps=7", "data.synthetic.order=1"],
        )
        .unwrap();
        assert_eq!(c.optim.lr, 5e-4);
        assert_eq!(c.train.steps, 7);
        assert_eq!(c.data.synthetic.order, 1);
        let d = c.differences(&TrainConfig::default(), RESUME_MAY_CHANGE);
        assert!(d.iter().any(|l| l.starts_with("optim.lr")), "{d:?}");
        assert!(!d.iter().any(|l| l.starts_with("train.steps")), "{d:?}");
    }
}
