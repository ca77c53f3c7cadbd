//! Before the first step: the config and run-folder checks, the data, this rank's model
//! chunks and starting state (fresh, `--init-from`, or a checkpoint of any layout), what the
//! ranks agree on; and the validation loss.

use super::model_config;
use super::records::{proc_status_bytes, RunOptions};
use crate::checkpoint::{self, TrainState};
use crate::config::TrainConfig;
use crate::data::{val_batch, window_count, DataPosition, Dataset};
use crate::error::TrainError;
use crate::fsutil::ensure_writable_dir;
use crate::pipeline::{forward_only, micro_batches, Pipeline, StageActs, StageModel};
use kernels::Par;
use model::{ParamLayout, Shard};

pub(super) fn mean_val_loss<E: crate::precision::Storage>(
    stage: &StageModel,
    params: &[E],
    acts: &mut StageActs<E>,
    val: &[u32],
    (b, t, batches): (usize, usize, usize),
    par: Par,
    mut pipe: Option<&mut Pipeline>,
) -> Result<f64, TrainError> {
    let (mut x, mut y) = (vec![0u32; b * t], vec![0u32; b * t]);
    let (mut sum, mut n) = (0.0f64, 0usize);
    for k in 0..batches {
        if !val_batch(val, t, b, k, &mut x, &mut y) {
            break;
        }
        if let Some(p) = pipe.as_deref_mut() {
            p.begin_step(u64::from(u32::MAX) - k as u64);
        }
        let loss = forward_only(stage, params, acts, (&x, &y), par, pipe.as_deref_mut())?;
        sum += loss.unwrap_or(f32::NAN) as f64;
        n += 1;
    }
    let mean = sum / n.max(1) as f64;
    match pipe {
        // The stage with the loss tells the others (bit for bit: a broadcast).
        Some(p) => {
            let bits = mean.to_bits();
            let mut buf = [
                f32::from_bits(bits as u32),
                f32::from_bits((bits >> 32) as u32),
            ];
            p.share(&mut buf, "sharing the validation loss")?;
            Ok(f64::from_bits(
                buf[0].to_bits() as u64 | (buf[1].to_bits() as u64) << 32,
            ))
        }
        None => Ok(mean),
    }
}

/// What ZeRO-3 runs with: one pipeline stage (tensor parallelism or not), all-reduce ranks
/// (any precision).
fn zero3_supported(_cfg: &TrainConfig, pipeline: bool, ps: bool) -> Result<(), TrainError> {
    let why = if pipeline {
        "pipeline parallelism (--pp > 1): ZeRO-3 gathers a stage's units for every \
         micro-batch of the schedule, which the pipeline executor does not drive; use --zero 1 \
         with a pipeline, or --zero 3 with --dp and --tp"
    } else if ps {
        "--grad-sync ps: the parameter servers keep whole gradients; use --grad-sync ring"
    } else {
        return Ok(());
    };
    Err(TrainError::Layout(format!(
        "--zero 3 is not combined with {why}"
    )))
}

/// [`mean_val_loss`] under ZeRO-3: each validation batch's forward gathers its weights (every
/// rank runs the same batches, so all get the same mean).
pub(super) fn zero3_val_loss<E: crate::precision::Storage>(
    d: &mut crate::dp::Dp,
    layout: &ParamLayout,
    acts: &mut StageActs<E>,
    val: &[u32],
    (b, t, batches): (usize, usize, usize),
    par: Par,
    mut pipe: Option<&mut crate::pipeline::Pipeline>,
) -> Result<f64, TrainError> {
    let (saved, scratch) = acts.first_set();
    let (mut x, mut y) = (vec![0u32; b * t], vec![0u32; b * t]);
    let (mut sum, mut n) = (0.0f64, 0usize);
    for k in 0..batches {
        if !val_batch(val, t, b, k, &mut x, &mut y) {
            break;
        }
        sum += crate::pipeline::with_tp(pipe.as_deref_mut(), |tp| {
            d.zero3_micro_batch(layout, saved, scratch, &x, &y, (None, 1.0), par, tp)
        })? as f64;
        n += 1;
    }
    Ok(sum / n.max(1) as f64)
}

/// Everything validated and loaded before the first step.
pub(super) struct Setup {
    /// The config with the data's vocabulary filled in.
    pub(super) rcfg: TrainConfig,
    pub(super) data: Dataset,
    /// The model chunks this rank holds (the whole model without a pipeline).
    pub(super) stage: StageModel,
    pub(super) state: TrainState,
    pub(super) warnings: Vec<String>,
    pub(super) threads: usize,
    pub(super) rss_before_model_bytes: u64,
}

/// Validates the config and the run folder, loads the data, and builds the starting state
/// (fresh, `--init-from`, or the newest valid checkpoint). Writes nothing into the run folder
/// until every check has passed.
pub(super) fn setup(cfg: &TrainConfig, opts: &RunOptions) -> Result<Setup, TrainError> {
    let origin = "config";
    cfg.check(origin)?;
    let out = &opts.out_dir;
    ensure_writable_dir(out)?;
    let existing = checkpoint::list(out);
    if !opts.resume && !existing.is_empty() {
        // With --overwrite the old checkpoints are deleted only once everything is validated
        // (below), so a bad config never costs an earlier run.
        if !opts.overwrite {
            return Err(TrainError::RunFolderInUse {
                dir: out.clone(),
                newest_step: existing[0].0,
            });
        }
    }
    let data = Dataset::load(cfg)?;
    if let Some(v) = cfg.model.vocab_size {
        if v != data.vocab_size {
            return Err(TrainError::Config {
                origin: origin.into(),
                field: "model.vocab_size".into(),
                reason: format!("{v}, but the data's vocabulary is {}", data.vocab_size),
            });
        }
    }
    if let Some(tp) = &cfg.data.tokenizer {
        crate::tokenizer::check_vocab(tp, data.vocab_size)?;
    }
    let mut rcfg = cfg.clone();
    rcfg.model.vocab_size = Some(data.vocab_size);
    let fingerprint = crate::dp::fingerprint(&rcfg, &data.train, &data.val);
    let mut dp = opts.dp.as_ref().map(|d| lock(d));
    if dp
        .as_ref()
        .is_some_and(|d| d.zero() == crate::dp::ZeroStage::Three)
    {
        zero3_supported(
            cfg,
            opts.pipeline.as_ref().is_some_and(|p| lock(p).shape.pp > 1),
            dp.as_ref().is_some_and(|d| d.is_parameter_server()),
        )?;
    }
    let mut pipe = opts.pipeline.as_ref().map(|p| lock(p));
    if let Some(p) = pipe.as_mut() {
        p.check_fingerprint(&fingerprint)?;
    }
    if let Some(d) = dp.as_mut() {
        d.check_fingerprint(&fingerprint)?;
    }
    let writer =
        dp.as_ref().is_none_or(|d| d.rank() == 0) && pipe.as_ref().is_none_or(|p| p.is_writer());
    let (b, t) = (cfg.train.batch_size, cfg.model.seq_len);
    if window_count(data.val.len(), t) < b {
        return Err(TrainError::Data(format!(
            "the validation stream has {} tokens, fewer than one batch of {b} × ({t} + 1)",
            data.val.len()
        )));
    }
    let threads = match cfg.train.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let rss_before_model_bytes = proc_status_bytes("VmRSS:");

    let mcfg = model_config(&rcfg, data.vocab_size);
    let full = ParamLayout::new(&mcfg, &Shard::full(&mcfg))?;
    let stage = match &pipe {
        Some(p) => StageModel::new_tp(&mcfg, &p.parts, &p.chunks(), p.tp())?,
        None => StageModel::whole(full.clone()),
    };
    // Data parallel: lay the gradient buckets out (they define the ZeRO pieces), then the
    // optimizer ranges this rank holds (the whole buffer without ZeRO).
    // Refuse what cannot fit before allocating anything of the model's size.
    // The step's list and the decisions the trainer will take from it (activation sets in
    // flight, weight panels): the report's prediction, computed before allocating.
    let ops = crate::pipeline::step_ops(pipe.as_deref(), cfg.train.grad_accum);
    let zero3 = dp
        .as_ref()
        .is_some_and(|d| d.zero() == crate::dp::ZeroStage::Three);
    let fp32 = cfg.train.precision == plan::recipe::Precision::Fp32;
    crate::fits::check_stage(&crate::fits::rank_memory(
        &stage,
        (b, t),
        &crate::pipeline::activation_sets(&stage, &ops),
        dp.as_deref(),
        pipe.as_deref(),
        (cfg.train.precision, cfg.train.recompute),
        crate::pipeline::weight_panels_wanted(fp32, micro_batches(&stage, &ops), zero3),
    ))?;
    let n = stage.len();
    let (dp_size, owned) = match dp.as_mut() {
        Some(d) => {
            if stage.chunks.len() == 1 {
                d.attach(&stage.chunks[0].1);
            } else {
                let windows: Vec<_> = stage.chunks.iter().map(|(_, l, w)| (l, w.start)).collect();
                d.attach_windows(&windows);
            }
            (d.size(), d.owned_ranges(n))
        }
        None => (1, vec![0..n]),
    };
    // The same ranges in the whole model's offsets (the checkpoint's), in this rank's order.
    let segments = crate::pipeline::full_segments(&stage, &full);
    let want_full: Vec<std::ops::Range<usize>> = crate::pipeline::to_full(&segments, &owned)
        .into_iter()
        .map(|(r, _)| r)
        .collect();
    let mut warnings = Vec::new();
    let loaded = if opts.resume {
        checkpoint::find_resume(out, &rcfg, dp_size, &|_| want_full.clone()).map(
            |(_m, _l, mut st, w)| {
                warnings = w;
                st.params = crate::pipeline::slice_full(&stage, &full, &st.params);
                st
            },
        )
    } else {
        let params = match &opts.init_from {
            Some(p) => checkpoint::load_init_weights(p, &full)
                .map(|w| crate::pipeline::slice_full(&stage, &full, &w)),
            None => {
                let mut params = vec![0.0f32; n];
                for (_, l, w) in &stage.chunks {
                    params[w.clone()].copy_from_slice(&l.init_params(cfg.train.seed));
                }
                Ok(params)
            }
        };
        let held = owned.iter().map(|r| r.len()).sum();
        params.map(|params| TrainState {
            step: 0,
            params,
            m: vec![0.0; held],
            v: vec![0.0; held],
            adam_step: 0,
            data_position: DataPosition::default(),
            tokens_seen: 0,
            best_val_loss: None,
            evals_without_improvement: 0,
            stability: None,
        })
    };
    // Every rank starts at the same step, or every rank stops.
    let start = loaded
        .as_ref()
        .map(|s| s.step)
        .map_err(|e| crate::error::chain_string(e));
    if let Some(p) = pipe.as_mut() {
        p.agree_on_start(start.clone())?;
    }
    if let Some(d) = dp.as_mut() {
        d.agree_on_start(start)?;
    }
    let state = loaded?;
    warnings.extend(crate::run_dir::RunDir::prepare(
        out,
        writer,
        opts.resume.then_some(state.step),
        &rcfg.to_toml(),
        cfg.data.tokenizer.as_deref(),
    )?);
    Ok(Setup {
        rcfg,
        data,
        stage,
        state,
        warnings,
        threads,
        rss_before_model_bytes,
    })
}

pub(super) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
