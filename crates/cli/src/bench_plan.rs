//! `scaletrain bench plan`: how many candidate layouts per second the planner evaluates.

use std::time::Instant;

use anyhow::Result;
use clap::Args;
use plan::search::{Objective, SearchSpace};

use crate::spec::SpecArgs;

/// Arguments of `bench plan`.
#[derive(Debug, Args)]
pub struct BenchPlanArgs {
    #[command(flatten)]
    spec: SpecArgs,
    /// Threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Repetitions (the best is reported).
    #[arg(long, default_value_t = 50)]
    reps: usize,
    /// JSON output.
    #[arg(long)]
    json: bool,
}

/// Runs the benchmark: a deadline search for the model over cluster sizes 8..=max GPUs (default
/// llama3-70b, H100, 8..16384 GPUs), so the space holds millions of candidates.
pub fn run(a: BenchPlanArgs) -> Result<()> {
    let mut spec = a.spec.with_config_file()?;
    if spec.model.is_none()
        && spec.params.is_none()
        && spec.hf_config.is_none()
        && spec.layers.is_none()
    {
        spec.model = Some("llama3-70b".into());
    }
    let (ctx, _) = spec.context(8)?;
    let gpn = ctx.cluster.gpus_per_node;
    let max = spec.gpus.unwrap_or(65536);
    let mut sizes = Vec::new();
    let mut n = gpn;
    while n <= max {
        sizes.push(n);
        // Powers of two and 1.5x steps give many divisor structures.
        if n * 3 / 2 <= max && (n * 3 / 2) % gpn == 0 {
            sizes.push(n * 3 / 2);
        }
        n *= 2;
    }
    let mut space = SearchSpace::for_gpus(sizes, gpn);
    space.max_tp = 64;
    space.micro_batches = vec![1, 2, 4, 8, 16, 32, 64];
    space.vpp = vec![1, 2, 3, 4, 6, 8];
    let threads = a.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|x| x.get())
            .unwrap_or(1)
    });
    let measure = |space: &SearchSpace| {
        let mut best = f64::INFINITY;
        let mut res = None;
        for _ in 0..a.reps.max(1) {
            let t = Instant::now();
            let r = crate::parallel_search(&ctx, space, Objective::Deadline(90.0), 10, a.threads);
            best = best.min(t.elapsed().as_secs_f64());
            res = Some(r);
        }
        (best, res.expect("at least one repetition"))
    };
    let (plan_secs, r) = measure(&space);
    space.cost_all = true;
    let (full_secs, rf) = measure(&space);
    let per_sec = r.candidates as f64 / plan_secs;
    let full_per_sec = rf.evaluated as f64 / full_secs;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"model": ctx.model.name, "threads": threads, "candidates": r.candidates, "costed": r.evaluated, "fit": r.accepted,
            "planner_secs": plan_secs, "candidates_per_sec": per_sec, "full_evaluations": rf.evaluated, "full_secs": full_secs, "full_evaluations_per_sec": full_per_sec})
        );
    } else {
        println!(
            "planner benchmark: {} over {} cluster sizes of {} ({} threads, best of {})",
            ctx.model.name,
            space.gpus.len(),
            ctx.cluster.gpu.name,
            threads,
            a.reps.max(1)
        );
        println!("  planner:  {} candidate layouts ({} structurally valid and memory-costed, {} fit) in {:.4} s = {:.2} M candidates/s",
            r.candidates, r.evaluated, r.accepted, plan_secs, per_sec / 1e6);
        println!("  full:     memory + step time for all {} valid layouts in {:.4} s = {:.2} M full evaluations/s", rf.evaluated, full_secs, full_per_sec / 1e6);
    }
    Ok(())
}
