//! The training loop (`crates/model` does the maths), in the storage precision the config
//! names (`f32`, or bf16/fp16 with fp32 master weights: `crate::precision`).
//!
//! Per optimizer step, in this order: learning rate from the schedule → `grad_accum`
//! micro-batches of forward + backward (gradients accumulate; each micro-batch's loss gradient
//! is `1 / (b·t·grad_accum)`, times the loss scale under fp16) → global gradient norm → the
//! stability decision (`stability.rs`: loss scale, non-finite values, loss spikes; every rank
//! decides alike) → clipping and AdamW on the fp32 master weights, and the 16-bit working copy
//! refreshed (or the step skipped, or rolled back to the last checkpoint) → metrics line →
//! validation (every `eval_every`) → early stopping → checkpoint (every `checkpoint_every`, at
//! the end, and when stopping). Nothing random happens outside the data order, so a run is a
//! pure function of its config, and a resumed run repeats the uninterrupted one bit for bit.

//!
//! Files: `records.rs` (the options, the step and start records, the observer, the summary),
//! `setup.rs` (checks, data, the starting state, validation loss), `stability.rs` (the
//! per-step decision and the rollback), this file (the loop).

mod predict;
mod records;
mod setup;
mod stability;

pub use records::{
    proc_status_bytes, Observer, PipelineInfo, Quiet, RunOptions, RunSummary, StartInfo, StepRecord,
};

use crate::config::Precision;
use crate::config::{OptimSection, TrainConfig};
use crate::data::Batcher;
use crate::dp::ZeroStage;
use crate::error::TrainError;
use crate::fsutil::write_atomic;
use crate::pipeline::{run_ops, MicroBatches, StageActs};
use crate::precision::{master_as, Storage};
use crate::run_dir::RunDir;
use kernels::adamw::{clip_factor, scale_inplace, sum_squares};
use kernels::{Bf16, Par, F16};
use model::{AdamW, AdamWConfig, ModelConfig, ParamLayout, Shard};
use predict::{predict, Predictions};
use setup::{lock, mean_val_loss, setup, Setup};
use stability::{load_last_checkpoint, Decision, Stability};
use std::time::Instant;

/// Learning rate at (0-based) `step`: linear warmup to `lr` over `warmup_steps`, then a cosine
/// from `lr` down to `min_lr` at `decay_steps`, then `min_lr` (Loshchilov & Hutter 2017's
/// cosine, without restarts, as nanoGPT uses it).
pub fn lr_at(o: &OptimSection, step: u64, decay_steps: u64) -> f32 {
    let (lr, min_lr) = (o.lr as f64, o.min_lr as f64);
    if step < o.warmup_steps {
        return (lr * (step + 1) as f64 / o.warmup_steps as f64) as f32;
    }
    if step >= decay_steps || decay_steps <= o.warmup_steps {
        return min_lr as f32;
    }
    let ratio = (step - o.warmup_steps) as f64 / (decay_steps - o.warmup_steps) as f64;
    let coeff = 0.5 * (1.0 + (std::f64::consts::PI * ratio).cos());
    (min_lr + coeff * (lr - min_lr)) as f32
}

/// The runtime's model config for `cfg` with vocabulary `vocab`.
pub fn model_config(cfg: &TrainConfig, vocab: usize) -> ModelConfig {
    ModelConfig {
        vocab_size: vocab,
        max_seq_len: cfg.model.seq_len,
        n_layer: cfg.model.n_layer,
        n_head: cfg.model.n_head,
        channels: cfg.model.channels,
    }
}

/// Runs (or resumes) training as `cfg` and `opts` say.
pub fn run(
    cfg: &TrainConfig,
    opts: &RunOptions,
    obs: &mut dyn Observer,
) -> Result<RunSummary, TrainError> {
    match cfg.train.precision {
        Precision::Fp32 => run_with::<f32>(cfg, opts, obs),
        Precision::Bf16Mixed => run_with::<Bf16>(cfg, opts, obs),
        Precision::Fp16Mixed => run_with::<F16>(cfg, opts, obs),
    }
}

/// [`run`] with storage type `E` (`f32`: the master weights are the working weights).
fn run_with<E: Storage>(
    cfg: &TrainConfig,
    opts: &RunOptions,
    obs: &mut dyn Observer,
) -> Result<RunSummary, TrainError> {
    let Setup {
        rcfg,
        data,
        stage,
        mut state,
        warnings,
        threads,
        rss_before_model_bytes,
    } = setup(cfg, opts)?;
    // Data parallel (crate::dp): this rank's peers; pipeline (crate::pipeline): the other
    // stages. Only the first stage's data-parallel rank 0 writes into the run folder.
    let mut dp = opts.dp.as_ref().map(|d| lock(d));
    let mut pipe = opts.pipeline.as_ref().map(|p| lock(p));
    let writer =
        dp.as_ref().is_none_or(|d| d.rank() == 0) && pipe.as_ref().is_none_or(|p| p.is_writer());
    let (dp_rank, dp_size) = dp.as_ref().map_or((0, 1), |d| (d.rank(), d.size()));
    let out = &opts.out_dir;
    let (b, t) = (cfg.train.batch_size, cfg.model.seq_len);
    let bt = b * t;
    let accum = cfg.train.grad_accum;
    let par = Par::Threads(threads);
    let mcfg = stage.chunks[0].1.cfg.clone();
    let layout = stage.chunks[0].1.clone();
    let n = stage.len();

    // ZeRO-2 writes gradients into the data-parallel bucket buffers instead (crate::dp).
    let full_grads = dp.as_ref().is_none_or(|d| d.needs_full_grads());
    let mut grads = vec![0.0f32; if full_grads { n } else { 0 }];
    // Mixed precision: the 16-bit working copy of the weights and the 16-bit gradient of one
    // micro-batch (crate::precision); empty in fp32, and under ZeRO-3, whose gather and
    // gradient buffers are in the storage type instead (crate::dp).
    let zero3 = dp.as_ref().is_some_and(|d| d.zero() == ZeroStage::Three);
    let whole_copy = master_as::<E>(&state.params).is_none() && !zero3;
    let mut work: Vec<E> = vec![E::default(); if whole_copy { n } else { 0 }];
    let mut staging: Vec<E> = vec![E::default(); if whole_copy { n } else { 0 }];
    let mut stab = Stability::new(cfg, state.stability.take());
    let mut opt = AdamW {
        m: std::mem::take(&mut state.m),
        v: std::mem::take(&mut state.v),
        step: state.adam_step,
    };
    if let Some(d) = dp.as_mut() {
        d.sync_params(&mut state.params)?;
        d.shard_optimizer(&opt, n);
        if d.zero() == ZeroStage::Three {
            // ZeRO-3 keeps only this rank's pieces of the weights (state.params is emptied).
            d.zero3_shard_params::<E>(&layout, &mut state.params);
        }
        let end = opts
            .stop_after
            .map_or(cfg.train.steps, |s| s.min(cfg.train.steps));
        d.announce(n, end.saturating_sub(state.step))?;
    }
    // The planner's list for this stage: with one stage, forward and backward of each
    // micro-batch in turn.
    let ops = crate::pipeline::step_ops(pipe.as_deref(), accum);
    let sp = pipe.as_ref().is_some_and(|p| p.sequence_parallel);
    let mut acts = StageActs::<E>::with_sp(&stage, &ops, b, t, cfg.train.recompute, sp)?;
    // Weights packed once per step for the matmuls when a step runs several micro-batches
    // (not under ZeRO-3, whose layers are gathered into shared buffers): the decision the fit
    // check made before allocating (crate::pipeline::weight_panels_wanted).
    acts.use_weight_panels(&stage, &ops, zero3);
    let mut batcher = Batcher::new(
        data.train.len(),
        t,
        b,
        cfg.train.seed,
        state.data_position,
        "the training stream",
    )?;
    let Predictions {
        dims,
        step: predicted_step,
        memory: predicted,
        pipeline,
    } = predict(
        cfg,
        &stage,
        &acts,
        dp.as_deref(),
        pipe.as_deref(),
        (b, t, accum, threads),
    );
    let start = StartInfo {
        config: rcfg.clone(),
        params: n,
        model_params: ParamLayout::new(&mcfg, &Shard::full(&mcfg))?.len(),
        start_step: state.step,
        loss_floor: data.loss_floor(t),
        threads,
        predicted,
        predicted_step,
        predicted_comm: dp.as_ref().filter(|_| pipe.is_none()).and_then(|d| {
            d.predict_comm(&dims, accum as u64, &predicted_step, cfg.train.precision)
        }),
        allocated_bytes: 4 * (state.params.len() + grads.len() + opt.m.len() + opt.v.len()) as u64
            + (E::BYTES * (work.len() + staging.len()) + acts.bytes() + acts.panel_bytes()) as u64
            + dp.as_ref().map_or(0, |d| d.extra_bytes()),
        rss_before_model_bytes,
        weight_panels: acts.panel_bytes() > 0,
        warnings,
        dp: dp.as_ref().map(|d| (d.rank(), d.size(), d.zero().number())),
        pipeline,
    };
    obs.on_start(&start);

    let mut run_dir = RunDir::open(out, writer)?;
    let total = cfg.train.steps;
    let end = opts.stop_after.map_or(total, |s| s.min(total));
    let decay = cfg.decay_steps();
    let (mut x, mut y) = (vec![0u32; bt], vec![0u32; bt]);
    let (mut xs, mut ys) = (vec![0u32; accum * bt], vec![0u32; accum * bt]);
    let mut records = Vec::new();
    let mut val_losses = Vec::new();
    let mut early_stopped = false;
    let mut interrupted = false;
    let mut last_checkpoint = None;
    let mut trace = opts.trace.as_ref().map(|_| {
        let (stage_idx, world_rank) = pipe
            .as_ref()
            .map_or((0, dp_rank), |p| (p.stage(), p.shape.rank(p.me)));
        crate::trace::Trace::new(
            world_rank,
            format!("rank {world_rank}: stage {stage_idx}, dp {dp_rank}"),
        )
    });
    let loop_start = Instant::now();
    // Data parallel: the global step is `dp_size × accum` micro-batches of the 1-rank order;
    // this rank trains its `accum` consecutive ones (crate::dp).
    let d_loss = 1.0 / (b * t * accum * dp_size) as f32;
    // The LM head's copy of the tied embedding (last stage of a pipeline) counts once in the
    // gradient norm: on the first stage; tensors replicated over tensor parallelism count on
    // its rank 0.
    let tied = stage.tied_range();
    // Data-parallel gradients reduced after the step's list instead of bucket by bucket inside
    // backward: with interleaved chunks (each chunk's last backward is a different op), and
    // under ZeRO-1 in a pipeline (the tied embedding's stages must be summed first).
    let deferred = dp.as_ref().is_some_and(|d| {
        stage.chunks.len() > 1
            || (d.zero() != crate::dp::ZeroStage::Off
                && pipe.as_ref().is_some_and(|p| p.shape.pp > 1))
    });
    let copies = stage.copies();
    let vocab = mcfg.vocab_size as u32;
    refresh_working(&mut work, &state.params);
    // ZeRO-3 (crate::dp, `zero3` above): micro-batches gather their weights; the full weights
    // exist only while a checkpoint is written.
    // Straggler detection (data parallel without a pipeline): every rank's busy time rides on
    // the losses' all-gather; rank 0 judges (crate::straggler).
    let dp_only = dp.is_some() && pipe.is_none();
    let slow_drill = match dp_only {
        true => crate::straggler::injected_delay(dp_rank)?,
        false => None,
    };
    let mut stragglers = (writer && dp_only).then(|| {
        crate::straggler::Detector::new(
            crate::straggler::StragglerConfig {
                margin: cfg.train.straggler_margin,
                window: cfg.train.straggler_window,
            },
            dp_size,
        )
    });
    // The stages' forward/backward times from the second step on (the first warms up).
    let first_step = state.step;
    let mut compute_since = pipe.as_ref().map(|p| p.compute_totals());
    while state.step < end {
        let step = state.step;
        if step == first_step + 1 {
            compute_since = pipe.as_ref().map(|p| p.compute_totals());
        }
        let comm_at_start = dp
            .as_ref()
            .map(|d| (d.comm_secs, d.exposed_secs, d.comm_wait_secs));
        let p2p_at_start = pipe.as_ref().map(|p| p.p2p_secs);
        let tp_at_start = pipe.as_ref().filter(|p| p.shape.tp > 1).map(|p| p.tp_secs);
        let t0 = Instant::now();
        let lr = lr_at(&cfg.optim, step, decay);
        grads.fill(0.0);
        for j in 0..accum * dp_size {
            if j / accum == dp_rank {
                let k = j % accum;
                batcher.next_batch(
                    &data.train,
                    &mut xs[k * bt..(k + 1) * bt],
                    &mut ys[k * bt..(k + 1) * bt],
                );
            } else {
                batcher.next_batch(&data.train, &mut x, &mut y);
            }
        }
        if stab.inject_bad_batch(step + 1) {
            // Fault injection: a corrupt batch (every target off by one token).
            ys.iter_mut().for_each(|y| *y = (*y + 1) % vocab);
        }
        if let Some(p) = pipe.as_mut() {
            p.begin_step(step);
        }
        let scale = stab.loss_scale().unwrap_or(1.0);
        let step_d_loss = if stab.inject_nan(step + 1) && dp_rank + 1 == dp_size {
            f32::NAN
        } else {
            d_loss * scale
        };
        let micro_batches = MicroBatches {
            xs: &xs,
            ys: &ys,
            bt,
            d_loss: step_d_loss,
            unscale: 1.0 / scale,
        };
        let micro_losses = if zero3 {
            let d = dp.as_deref_mut().expect("ZeRO-3 is data parallel");
            crate::dp::zero3_micro_batches(
                d,
                &layout,
                &mut acts,
                &micro_batches,
                par,
                pipe.as_deref_mut(),
            )?
        } else {
            run_ops(
                &ops,
                &stage,
                master_as::<E>(&state.params).unwrap_or(&work),
                &mut grads,
                &mut staging,
                &mut acts,
                &micro_batches,
                par,
                pipe.as_deref_mut(),
                if deferred { None } else { dp.as_deref_mut() },
                trace.as_mut(),
            )?
        };
        if deferred {
            // The tied embedding's gradient is summed over its two stages first, then every
            // bucket over data parallelism (under ZeRO-1 only this rank's pieces are reduced,
            // so the tie could not come after).
            if let (Some(p), Some((r, _))) = (pipe.as_mut(), &tied) {
                p.reduce_tied(&mut grads[r.clone()])?;
            }
            if let Some(d) = dp.as_mut() {
                d.reduce_all(&mut grads)?;
            }
        }
        if let (Some(tr), Some(d)) = (trace.as_mut(), dp.as_mut()) {
            for (k, a, b, wait) in d.take_bucket_spans() {
                tr.span(crate::trace::COMM, "dp", &format!("bucket {k}"), a, b);
                if wait > 0.0 {
                    let w = a + std::time::Duration::from_secs_f64(wait);
                    tr.span(
                        crate::trace::COMM,
                        "dp",
                        "waiting for the other ranks",
                        a,
                        w.min(b),
                    );
                }
            }
        }
        // Every rank learns every micro-batch's loss (from the stage that has them) and whether
        // any rank was asked to stop, so all stop at the same step.
        let mut dist_stop = None;
        let mut rank_busy = None;
        let mut losses = micro_losses;
        if let Some(d) = slow_drill {
            std::thread::sleep(d);
        }
        if dp.is_some() || pipe.is_some() {
            let busy = t0.elapsed().as_secs_f64()
                - comm_at_start
                    .zip(dp.as_ref())
                    .map_or(0.0, |((_, e, _), d)| d.exposed_secs - e);
            let stop = opts
                .stop
                .as_ref()
                .is_some_and(|f| f.load(std::sync::atomic::Ordering::SeqCst));
            if losses.is_empty() {
                losses = vec![0.0; accum];
            }
            let (mut all, mut any_stop) = match dp.as_mut() {
                Some(d) => {
                    let g = d.gather_losses(&losses, stop, busy as f32)?;
                    rank_busy = g.busy_secs;
                    (g.losses, g.any_stop)
                }
                None => (losses, stop),
            };
            if let Some(p) = pipe.as_mut() {
                p.share(&mut all, "sharing the losses")?;
                any_stop = p.any(any_stop, "agreeing on a stop")?;
            }
            losses = all;
            dist_stop = Some(any_stop);
        }
        // Same f64 summation order as one rank with grad_accum = dp × accum.
        let loss_sum: f64 = losses.iter().map(|&l| l as f64).sum();
        let loss = (loss_sum / (accum * dp_size) as f64) as f32;
        let ocfg = AdamWConfig {
            lr,
            beta1: cfg.optim.beta1,
            beta2: cfg.optim.beta2,
            eps: cfg.optim.eps,
            weight_decay: cfg.optim.weight_decay,
            grad_clip: (cfg.optim.grad_clip > 0.0).then_some(cfg.optim.grad_clip),
        };
        if let (false, Some(p), Some((r, _))) = (deferred, pipe.as_mut(), &tied) {
            p.reduce_tied(&mut grads[r.clone()])?;
        }
        let t_opt = Instant::now();
        // The stability decision comes before anything reaches the weights; every rank sees
        // the same loss and global norm, so every rank decides alike.
        let counts_before = stab.counts();
        let mut decision = Decision::Apply;
        let mut decide = |norm: f64| -> Result<bool, TrainError> {
            decision = stab.decide(step + 1, loss, norm)?;
            Ok(decision == Decision::Apply)
        };
        let grad_norm = match dp.as_mut() {
            // ZeRO and parameter servers reduce or shard inside their own step.
            Some(d) if d.zero() != crate::dp::ZeroStage::Off || d.is_parameter_server() => {
                let mut combine = |sq: f64| match pipe.as_deref_mut() {
                    Some(p) => p.sum_over_mesh(sq),
                    None => Ok(sq),
                };
                let mesh = crate::dp::MeshNorm {
                    copies: &copies,
                    combine: &mut combine,
                };
                d.step_in_mesh(
                    &layout,
                    &mut state.params,
                    &mut grads,
                    &mut opt,
                    &ocfg,
                    par,
                    mesh,
                    &mut decide,
                )?
            }
            _ => 'own: {
                let mut sq = 0.0f64;
                for piece in crate::dp::subtract(0..grads.len(), &copies) {
                    sq += sum_squares(&grads[piece]);
                }
                if let Some(p) = pipe.as_mut() {
                    sq = p.sum_over_mesh(sq)?;
                }
                let norm = sq.sqrt();
                if !decide(norm)? {
                    break 'own norm;
                }
                if let Some(max_norm) = ocfg.grad_clip {
                    scale_inplace(&mut grads, clip_factor(norm, max_norm));
                }
                opt.step += 1;
                for (_, l, w) in &stage.chunks {
                    model::adamw_update_range(
                        l,
                        0,
                        &mut state.params[w.clone()],
                        &mut opt.m[w.clone()],
                        &mut opt.v[w.clone()],
                        &grads[w.clone()],
                        &ocfg,
                        opt.step,
                        par,
                    );
                }
                norm
            }
        };
        if decision == Decision::Apply {
            refresh_working(&mut work, &state.params);
        }
        if let Some(tr) = trace.as_mut() {
            tr.span(
                crate::trace::MAIN,
                "optimizer",
                "clip + AdamW",
                t_opt,
                Instant::now(),
            );
        }
        let comm = comm_at_start.zip(dp.as_ref()).map(|((c, e, w), d)| {
            (
                d.comm_secs - c,
                d.exposed_secs - e,
                d.measures_peer_wait().then(|| d.comm_wait_secs - w),
            )
        });
        state.step += 1;
        state.tokens_seen += (b * t * accum * dp_size) as u64;
        let step_secs = t0.elapsed().as_secs_f64();
        let rec = StepRecord {
            step: state.step,
            loss,
            lr,
            grad_norm,
            tokens_per_sec: (b * t * accum * dp_size) as f64 / step_secs,
            step_secs,
            comm_secs: comm.map(|c| c.0),
            exposed_comm_secs: comm.map(|c| c.1),
            comm_wait_secs: comm.and_then(|c| c.2),
            p2p_secs: p2p_at_start
                .zip(pipe.as_ref())
                .filter(|(_, p)| p.shape.pp > 1)
                .map(|(s, p)| p.p2p_secs - s),
            tp_secs: tp_at_start.zip(pipe.as_ref()).map(|(s, p)| p.tp_secs - s),
            loss_scale: stab.loss_scale().map(|_| scale),
            skipped: decision != Decision::Apply,
            skip_reason: match decision {
                Decision::Apply => None,
                Decision::Skip(why) => Some(why),
                Decision::Rollback { .. } => Some("rollback"),
            },
            loss_spike: stab.counts().loss_spikes > counts_before.loss_spikes,
            grad_norm_spike: stab.counts().grad_norm_spikes > counts_before.grad_norm_spikes,
        };
        run_dir.record(&rec)?;
        obs.on_step(&rec, total);
        if let (Some(det), Some(busy)) = (stragglers.as_mut(), &rank_busy) {
            let busy: Vec<f64> = busy.iter().map(|&b| b as f64).collect();
            for s in det.observe(state.step, &busy, step_secs) {
                eprintln!("{}", s.message());
                run_dir.record(&s.record())?;
            }
        }
        records.push(rec);
        if let Decision::Rollback { loss, threshold } = decision {
            // Back to the last checkpoint's weights, optimizer and step; the batcher keeps its
            // position, so the data since the checkpoint (the spike's batch included) is skipped.
            let owned = dp
                .as_ref()
                .map_or_else(|| vec![0..n], |d| d.owned_ranges(n));
            if let Some(st) = load_last_checkpoint(out, &rcfg, &mcfg, &stage, dp_size, &owned)? {
                let from = state.step;
                stab.rolled_back(from, st.step)?;
                state.params = st.params;
                if let Some(d) = dp.as_mut().filter(|_| zero3) {
                    d.zero3_set_params(&state.params);
                    state.params = Vec::new();
                }
                opt.m = st.m;
                opt.v = st.v;
                opt.step = st.adam_step;
                state.step = st.step;
                state.tokens_seen = st.tokens_seen;
                state.best_val_loss = st.best_val_loss;
                state.evals_without_improvement = st.evals_without_improvement;
                refresh_working(&mut work, &state.params);
                run_dir.rewind(state.step)?;
                run_dir.record(&serde_json::json!({
                    "step": state.step,
                    "rollback_from": from,
                    "spike_loss": loss,
                    "threshold": threshold,
                }))?;
                obs.on_rollback(from, state.step, loss, threshold);
                continue;
            }
        }

        let last = state.step == end;
        let eval_due = last || (cfg.train.eval_every > 0 && state.step % cfg.train.eval_every == 0);
        if eval_due {
            let t_eval = Instant::now();
            let vl = match dp.as_deref_mut().filter(|_| zero3) {
                Some(d) => setup::zero3_val_loss(
                    d,
                    &layout,
                    &mut acts,
                    &data.val,
                    (b, t, cfg.train.eval_batches),
                    par,
                    pipe.as_deref_mut(),
                )?,
                None => mean_val_loss(
                    &stage,
                    master_as::<E>(&state.params).unwrap_or(&work),
                    &mut acts,
                    &data.val,
                    (b, t, cfg.train.eval_batches),
                    par,
                    pipe.as_deref_mut(),
                )?,
            };
            run_dir.record(&serde_json::json!({"step": state.step, "val_loss": vl}))?;
            run_dir.flush()?;
            if let Some(tr) = trace.as_mut() {
                tr.span(
                    crate::trace::MAIN,
                    "eval",
                    "validation",
                    t_eval,
                    Instant::now(),
                );
            }
            obs.on_eval(state.step, vl);
            val_losses.push((state.step, vl));
            match state.best_val_loss {
                Some(best) if vl > best - cfg.train.min_delta => {
                    state.evals_without_improvement += 1
                }
                _ => {
                    state.best_val_loss = Some(vl);
                    state.evals_without_improvement = 0;
                }
            }
            if cfg.train.patience > 0 && state.evals_without_improvement >= cfg.train.patience {
                early_stopped = true;
            }
        }
        let interrupted_now = dist_stop.unwrap_or_else(|| {
            opts.stop
                .as_ref()
                .is_some_and(|f| f.load(std::sync::atomic::Ordering::SeqCst))
        });
        interrupted |= interrupted_now;
        let ckpt_due = last
            || early_stopped
            || interrupted
            || (cfg.train.checkpoint_every > 0 && state.step % cfg.train.checkpoint_every == 0);
        if ckpt_due {
            let t_ckpt = Instant::now();
            run_dir.flush()?;
            // Rank 0 writes the weights; under ZeRO every rank writes the optimizer ranges it
            // holds and rank 0 publishes the manifest once all have (checkpoint::save_rank).
            state.m = std::mem::take(&mut opt.m);
            state.v = std::mem::take(&mut opt.v);
            state.adam_step = opt.step;
            state.stability = Some(stab.state());
            state.data_position = batcher.position();
            if let Some(d) = dp.as_mut().filter(|_| zero3) {
                state.params = d.zero3_full_params()?;
            }
            let owned = dp
                .as_ref()
                .map_or_else(|| vec![0..n], |d| d.owned_ranges(n));
            let saved = run_dir.save_checkpoint(
                pipe.as_deref_mut(),
                dp.as_deref_mut(),
                (&rcfg, &stage),
                &state,
                &owned,
            );
            opt.m = std::mem::take(&mut state.m);
            opt.v = std::mem::take(&mut state.v);
            if zero3 {
                state.params = Vec::new();
            }
            if let Some(tr) = trace.as_mut() {
                tr.span(
                    crate::trace::MAIN,
                    "checkpoint",
                    "checkpoint",
                    t_ckpt,
                    Instant::now(),
                );
            }
            if let Some(path) = saved? {
                obs.on_checkpoint(state.step, &path);
                last_checkpoint = Some(path);
            }
        }
        if early_stopped || interrupted {
            break;
        }
    }
    run_dir.flush()?;
    let simulated_wait_secs = match (pipe.as_mut(), &compute_since) {
        (Some(p), Some(since)) if p.shape.pp > 1 => {
            Some(p.simulated_wait(since, (accum, b, t, mcfg.channels))?)
        }
        _ => None,
    };
    if let Some(d) = dp.as_mut().filter(|_| zero3) {
        state.params = d.zero3_full_params()?;
    }
    let wall_secs = loop_start.elapsed().as_secs_f64();
    let mut secs: Vec<f64> = records.iter().map(|r| r.step_secs).collect();
    secs.sort_by(f64::total_cmp);
    let median_step_secs = secs.get(secs.len() / 2).copied().unwrap_or(0.0);
    let step_total: f64 = secs.iter().sum();
    let tokens_per_sec = if step_total > 0.0 {
        (records.len() * b * t * accum * dp_size) as f64 / step_total
    } else {
        0.0
    };
    if let (Some(tr), Some(path)) = (&trace, &opts.trace) {
        // Every rank's events to the job's rank 0, which writes one file.
        let mine = tr.body();
        let all = match (pipe.as_mut(), dp.as_mut()) {
            (Some(p), _) => {
                p.world_gather_bytes(mine.as_bytes(), "trace: gathering the ranks' events")?
            }
            (None, Some(d)) if !d.is_parameter_server() => {
                d.all_gather_bytes(mine.as_bytes(), "trace: gathering the ranks' events")?
            }
            _ => vec![mine.into_bytes()],
        };
        if writer {
            let bodies: Vec<String> = all
                .into_iter()
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .collect();
            write_atomic(path, crate::trace::file(&bodies).as_bytes())?;
        }
    }
    run_dir.finish(start.loss_floor)?;
    Ok(RunSummary {
        config: rcfg,
        steps_done: state.step,
        records,
        val_losses,
        params: state.params,
        loss_floor: start.loss_floor,
        early_stopped,
        interrupted,
        wall_secs,
        tokens_per_sec,
        median_step_secs,
        simulated_wait_secs,
        peak_rss_bytes: proc_status_bytes("VmHWM:"),
        guard: stab.counts(),
        skipped_steps: stab.skipped,
        rollbacks: stab.rollbacks,
        final_loss_scale: stab.loss_scale(),
        rank_times: stragglers.map_or_else(Vec::new, |d| d.summary()),
        start,
        last_checkpoint,
    })
}

/// Rounds the fp32 master weights into the 16-bit working copy forward and backward read
/// (nothing in fp32, where the master weights are read directly).
fn refresh_working<E: Storage>(work: &mut [E], master: &[f32]) {
    if !work.is_empty() {
        E::store(master, work);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_follows_a_cosine_to_min_lr() {
        let o = OptimSection {
            lr: 1.0,
            min_lr: 0.1,
            warmup_steps: 10,
            ..Default::default()
        };
        assert!((lr_at(&o, 0, 110) - 0.1).abs() < 1e-6);
        assert!((lr_at(&o, 9, 110) - 1.0).abs() < 1e-6);
        assert!((lr_at(&o, 10, 110) - 1.0).abs() < 1e-6);
        assert!((lr_at(&o, 60, 110) - 0.55).abs() < 1e-6);
        assert!((lr_at(&o, 110, 110) - 0.1).abs() < 1e-6);
        assert!((lr_at(&o, 500, 110) - 0.1).abs() < 1e-6);
        let mut prev = f32::INFINITY;
        for s in 10..110 {
            let l = lr_at(&o, s, 110);
            assert!(l <= prev);
            prev = l;
        }
    }
}
