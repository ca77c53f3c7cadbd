//! `scaletrain train --dp N --pp M …`: the data- and pipeline-parallel flags, the layout check
//! (`plan`'s, through `train::mesh::resolve`), joining the job (torchrun's environment, set by
//! `scaletrain launch`, torchrun or mpirun), forming the mesh's groups, and self-launching when
//! started without a job environment. The training itself is `train::run` with `train::dp` and
//! `train::pipeline` hooks.

use anyhow::{bail, Context, Result};
use std::sync::{Arc, Mutex};
use train::dp::{Dp, Role, ZeroStage};
use train::pipeline::{Pipeline, Schedule};
use train::TrainConfig;

/// How data-parallel gradients are combined (`--grad-sync`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GradSyncArg {
    /// All-reduce over the job's communicator (ring or tree by size).
    #[default]
    Ring,
    /// Parameter servers (`--servers K` extra processes).
    Ps,
    /// The MPI library's all-reduce (a `--features mpi` build under mpirun).
    Mpi,
}

impl std::fmt::Display for GradSyncArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GradSyncArg::Ring => "ring",
            GradSyncArg::Ps => "ps",
            GradSyncArg::Mpi => "mpi",
        })
    }
}

/// Data-parallel flags of `scaletrain train`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct DpArgs {
    /// Data-parallel ranks (each trains the whole model on its share of every global batch).
    /// Without a job environment (RANK unset), `train` launches the ranks itself on this host.
    #[arg(long, default_value_t = 1)]
    pub dp: usize,
    /// How gradients are combined: ring (all-reduce), ps (parameter servers, synchronous), mpi
    /// (all-reduce by the MPI library; needs a build with --features mpi and mpirun).
    #[arg(long, value_enum, default_value_t = GradSyncArg::Ring)]
    pub grad_sync: GradSyncArg,
    /// Parameter-server processes with --grad-sync ps.
    #[arg(long, default_value_t = 1)]
    pub servers: usize,
    /// With --grad-sync ps: asynchronous parameter server, a worker may run this many steps
    /// ahead of the slowest (unset = synchronous).
    #[arg(long)]
    pub staleness: Option<usize>,
    /// ZeRO stage: 0 = replicated optimizer state, 1 = AdamW state sharded, 2 = AdamW state and
    /// reduced gradients sharded, 3 = weights sharded too, each layer gathered just before use
    /// (ring or mpi, not ps; 3: fp32, no --pp/--tp).
    #[arg(long, default_value_t = 0)]
    pub zero: u8,
    /// Global batch in sequences = dp × batch_size × grad_accum; sets train.grad_accum (must divide).
    #[arg(long)]
    pub global_batch: Option<usize>,
    /// Gradient bucket size in MiB: a bucket (a range of whole layers) is reduced as soon as
    /// backward has finished it, while backward goes on with earlier layers.
    #[arg(long, default_value_t = train::dp::DEFAULT_BUCKET_BYTES as f64 / 1048576.0)]
    pub bucket_mb: f64,
    /// Reduce each gradient bucket on the training thread as backward finishes it, instead of
    /// on a communication thread while backward goes on (same bits; for measuring what overlap
    /// hides, or when the ranks' threads fill every core). Overlap works with --grad-sync mpi
    /// too (MPI_THREAD_SERIALIZED).
    #[arg(long)]
    pub no_overlap: bool,
    /// Pipeline stages: each rank holds a contiguous range of layers (the first also the
    /// embedding, the last the final norm, LM head and loss) and runs the planner's schedule.
    /// dp × pp ranks in all; without a job environment, `train` launches them on this host.
    #[arg(long, default_value_t = 1)]
    pub pp: usize,
    /// Pipeline schedule: gpipe (all forwards, then all backwards), 1f1b (one forward, one
    /// backward: at most pp − stage micro-batches in flight) or interleaved (1F1B over --vpp
    /// model chunks per stage).
    #[arg(long, default_value = "1f1b")]
    pub schedule: String,
    /// Model chunks per pipeline stage: with 2 or more, the interleaved 1F1B schedule (stage s
    /// holds virtual stages s, s + pp, …; micro-batches must be a multiple of pp).
    #[arg(long, default_value_t = 1)]
    pub vpp: usize,
    /// Micro-batches per step and pipeline (sets train.grad_accum; the global batch is
    /// dp × microbatches × batch_size sequences).
    #[arg(long)]
    pub microbatches: Option<usize>,
    /// Layers of each pipeline stage, e.g. 3,5 (default: an even split).
    #[arg(long, value_delimiter = ',')]
    pub pp_layers: Option<Vec<usize>>,
    /// Tensor-parallel degree (Megatron-LM): each rank of a group holds 1/tp of every layer's
    /// attention heads and MLP columns and runs the layer's collectives with the others. Must
    /// divide model.n_head; dp × pp × tp ranks in all.
    #[arg(long, default_value_t = 1)]
    pub tp: usize,
    /// Sequence parallelism with --tp (Korthikanti et al. 2022): layer norms, residual adds
    /// and their activations split along the b·t rows across the tensor-parallel group
    /// (all-gather / reduce-scatter instead of all-reduce); activation memory per rank drops.
    #[arg(long)]
    pub sequence_parallel: bool,
}

impl DpArgs {
    /// (bucket bytes, overlap) for `Dp::with_buckets`.
    fn buckets(&self) -> (usize, bool) {
        ((self.bucket_mb * 1048576.0) as usize, !self.no_overlap)
    }
}

/// What this process does.
pub enum Setup {
    /// One process, no peers.
    Single,
    /// A training rank: its data-parallel group (if any) and pipeline (if any).
    Worker {
        /// Data-parallel peers.
        dp: Option<Arc<Mutex<Dp>>>,
        /// Pipeline stages.
        pipeline: Option<Arc<Mutex<Pipeline>>>,
    },
    /// A parameter server (trains nothing).
    Server(train::dp::PsServer),
    /// No job environment: start the ranks (this program, same arguments) and supervise them.
    Launch,
}

/// Checks the layout against the config (and sets `grad_accum` from `--global-batch`).
pub fn check_layout(a: &DpArgs, cfg: &mut TrainConfig) -> Result<()> {
    if a.dp == 0 {
        bail!("--dp must be at least 1");
    }
    let zero = ZeroStage::from_number(a.zero)
        .with_context(|| format!("--zero {}: expected 0, 1, 2 or 3", a.zero))?;
    if zero == ZeroStage::Three && a.pp > 1 {
        bail!(
            "--zero 3 with --pp {}: ZeRO-3 gathers a stage's units for every micro-batch, which the \
             pipeline executor does not drive; use --zero 3 with --dp (and --tp), or --zero 1 with a pipeline",
            a.pp
        );
    }
    if !(a.bucket_mb.is_finite() && a.bucket_mb > 0.0) {
        bail!(
            "--bucket-mb {}: expected a positive size in MiB (e.g. 2; larger than the model = one bucket)",
            a.bucket_mb
        );
    }
    if a.staleness.is_some() && a.grad_sync != GradSyncArg::Ps {
        bail!("--staleness needs --grad-sync ps");
    }
    match a.grad_sync {
        GradSyncArg::Ring | GradSyncArg::Mpi => {}
        GradSyncArg::Ps if zero != ZeroStage::Off => {
            bail!(
                "--zero {} needs --grad-sync ring or mpi (the parameter server keeps whole gradients)",
                a.zero
            )
        }
        GradSyncArg::Ps if a.servers == 0 => bail!("--grad-sync ps needs --servers ≥ 1"),
        GradSyncArg::Ps if cfg.train.patience > 0 => {
            bail!("--grad-sync ps cannot stop early (train.patience > 0): the servers serve a fixed number of steps")
        }
        GradSyncArg::Ps => {}
    }
    if a.pp == 0 {
        bail!("--pp must be at least 1");
    }
    if a.tp == 0 {
        bail!("--tp must be at least 1");
    }
    if a.sequence_parallel && a.tp < 2 {
        bail!("--sequence-parallel splits activations across the tensor-parallel group: it needs --tp 2 or more");
    }
    if a.sequence_parallel && !(cfg.train.batch_size * cfg.model.seq_len).is_multiple_of(a.tp) {
        bail!(
            "--sequence-parallel: tp ({}) must divide batch_size × seq_len = {} × {} (the rows it splits)",
            a.tp,
            cfg.train.batch_size,
            cfg.model.seq_len
        );
    }
    if a.tp > 1 && a.grad_sync == GradSyncArg::Ps {
        bail!("--tp with --grad-sync ps: the parameter server is not combined with tensor parallelism; use --grad-sync ring");
    }
    let schedule: Schedule = a
        .schedule
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--schedule: {e}"))?;
    if a.pp > 1 {
        if a.grad_sync == GradSyncArg::Ps {
            bail!("--pp with --grad-sync ps: the parameter server is not combined with pipelines; use --grad-sync ring");
        }
        // DeepSpeed's pipeline engine refuses ZeRO-2/3 too: they reduce gradients every
        // micro-batch, which a pipeline's interleaved forwards and backwards make costly.
        if zero == ZeroStage::Two {
            bail!(
                "--zero 2 with --pp {}: ZeRO-2 reduces gradients after every micro-batch, which pipelines do not combine with (as in DeepSpeed); use --zero 1 (optimizer state sharded, gradients reduced once per step)",
                a.pp
            );
        }
        if zero != ZeroStage::Off && a.vpp > 1 {
            bail!(
                "--zero {} with --vpp {}: ZeRO over interleaved chunks is not built yet; use --vpp 1 with ZeRO-1, or --zero 0 with --vpp {}",
                a.zero, a.vpp, a.vpp
            );
        }
    }
    if schedule == Schedule::Interleaved && a.vpp < 2 {
        bail!("--schedule interleaved needs --vpp 2 or more (model chunks per stage)");
    }
    if a.vpp > 1 {
        if a.pp < 2 {
            bail!("--vpp {} needs --pp 2 or more", a.vpp);
        }
        if schedule == Schedule::Gpipe {
            bail!(
                "--vpp {} runs the interleaved 1F1B schedule; drop --schedule gpipe",
                a.vpp
            );
        }
    }
    if let Some(m) = a.microbatches {
        if m == 0 {
            bail!("--microbatches must be at least 1");
        }
        if a.global_batch
            .is_some_and(|g| g != a.dp * m * cfg.train.batch_size)
        {
            bail!(
                "--global-batch {} disagrees with dp({}) × microbatches({m}) × batch_size({}); give one of them",
                a.global_batch.unwrap_or(0),
                a.dp,
                cfg.train.batch_size
            );
        }
        cfg.train.grad_accum = m;
    }
    if let Some(g) = a.global_batch {
        let per = a.dp * cfg.train.batch_size;
        if g == 0 || g % per != 0 {
            bail!(
                "--global-batch {g} is not a multiple of dp({}) × batch_size({}) = {per}",
                a.dp,
                cfg.train.batch_size
            );
        }
        cfg.train.grad_accum = g / per;
    }
    if a.pp > 1 || a.tp > 1 {
        let mcfg = mesh_model(cfg);
        let req = plan::layout::LayoutRequest {
            dp: Some(a.dp as u64),
            pp: Some(a.pp as u64),
            tp: Some(a.tp as u64),
            vpp: Some(a.vpp as u64),
            zero: Some(a.zero),
            ..Default::default()
        };
        let parts = train::mesh::partition(
            &mcfg,
            (cfg.train.batch_size, cfg.model.seq_len),
            a.pp * a.vpp,
            a.pp_layers.as_deref(),
        )?;
        train::mesh::resolve(
            &mcfg,
            &req,
            a.dp * a.pp * a.tp,
            cfg.train.batch_size,
            cfg.train.grad_accum,
            &parts,
        )?;
    } else if a.pp_layers.is_some() {
        bail!("--pp-layers needs --pp > 1");
    }
    Ok(())
}

/// The model as the runtime builds it, for the layout check and the stage balance (the
/// vocabulary is the data's, read later: the config's or the synthetic corpus's here).
fn mesh_model(cfg: &TrainConfig) -> model::ModelConfig {
    model::ModelConfig {
        vocab_size: cfg.model.vocab_size.unwrap_or(match cfg.data.source {
            train::config::DataSource::Synthetic => cfg.data.synthetic.vocab_size,
            // Token files: the head's share of the balance is estimated with GPT-2's vocabulary
            // (every rank makes the same estimate, so they agree on the partition).
            train::config::DataSource::Files => 50257,
        }),
        max_seq_len: cfg.model.seq_len,
        n_layer: cfg.model.n_layer,
        n_head: cfg.model.n_head,
        channels: cfg.model.channels,
    }
}

/// `--resume` with neither `--global-batch` nor an explicit `train.grad_accum` (`accum_given`):
/// sets `grad_accum` so that dp × grad_accum micro-batches equal the global batch of the newest
/// checkpoint in `out`, so another `--dp` keeps the global batch. Returns what it did, to print.
/// When no grad_accum can keep it (dp does not divide it), leaves the config as it is and the
/// resume is refused with the reason (`train::checkpoint::find_resume`).
pub fn keep_global_batch(
    a: &DpArgs,
    accum_given: bool,
    out: &std::path::Path,
    cfg: &mut TrainConfig,
) -> Option<String> {
    if a.global_batch.is_some() || accum_given {
        return None;
    }
    // The checkpoint resume will pick: the newest whose files are all there at their recorded
    // sizes (resume also checks their SHA-256; a same-size corruption is rare enough to leave
    // to its clear refusal).
    let g = train::checkpoint::list(out)
        .iter()
        .find_map(|(_, p)| {
            let m = train::checkpoint::read_manifest(p).ok()?;
            train::checkpoint::files_present(p, &m).then_some(m)
        })?
        .global_micro_batches;
    let dp = a.dp as u64;
    // 0: a version-1 checkpoint, which did not record its global batch.
    if g == 0 || g % dp != 0 || g / dp == cfg.train.grad_accum as u64 {
        return None;
    }
    cfg.train.grad_accum = (g / dp) as usize;
    Some(format!(
        "resume: train.grad_accum = {} keeps the checkpoint's global batch of {g} micro-batches at \
         dp {dp} (--global-batch or --set train.grad_accum overrides)",
        g / dp
    ))
}

fn env_set(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.is_empty())
}

/// Whether `mpirun` (Open MPI) started this process: it sets `OMPI_COMM_WORLD_RANK`, not torchrun's
/// `RANK`.
fn under_mpirun() -> bool {
    env_set("OMPI_COMM_WORLD_RANK")
}

/// Processes of the job on this host: torchrun's `LOCAL_WORLD_SIZE`, else Open MPI's
/// `OMPI_COMM_WORLD_LOCAL_SIZE`, else 1.
fn local_world_size() -> usize {
    ["LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.trim().parse().ok())
        .unwrap_or(1)
}

/// The MPI world (`--grad-sync mpi`): rank and size come from MPI, not from the environment.
#[cfg(feature = "mpi")]
fn mpi_world() -> Result<Box<dyn comm::Communicator>> {
    Ok(Box::new(
        comm::mpi_comm::MpiComm::init().context("initialising MPI")?,
    ))
}

#[cfg(not(feature = "mpi"))]
fn mpi_world() -> Result<Box<dyn comm::Communicator>> {
    bail!("--grad-sync mpi needs a build with `--features mpi` (cargo build --release -p scaletrain-cli --features mpi)")
}

/// Joins the job the environment describes, or asks for a launch.
pub fn setup(a: &DpArgs, cfg: &mut TrainConfig) -> Result<Setup> {
    let zero = ZeroStage::from_number(a.zero).unwrap_or_default();
    let mpirun = under_mpirun();
    let in_job = env_set("RANK") || mpirun;
    let mpi = a.grad_sync == GradSyncArg::Mpi;
    if mpi && !mpirun && (in_job || a.dp > 1) {
        bail!(
            "--grad-sync mpi: start the ranks with mpirun (mpirun -n {0} scaletrain train --dp {0} --grad-sync mpi …); \
             OMPI_COMM_WORLD_RANK is not set, so this process was not started by Open MPI's mpirun",
            a.dp
        );
    }
    if !in_job {
        return Ok(if a.dp * a.pp * a.tp > 1 {
            Setup::Launch
        } else {
            Setup::Single
        });
    }
    if mpirun
        && !mpi
        && !env_set("RANK")
        && std::env::var("SCALETRAIN_TRANSPORT").as_deref() != Ok("mpi")
    {
        bail!(
            "started by mpirun, but --grad-sync {} needs torchrun's variables (RANK, WORLD_SIZE, MASTER_PORT; \
             scaletrain launch or torchrun set them): under mpirun pass --grad-sync mpi",
            a.grad_sync
        );
    }
    let servers = if a.grad_sync == GradSyncArg::Ps {
        a.servers
    } else {
        0
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cfg.train.threads == 0 {
        // The ranks of this host share its cores.
        cfg.train.threads = (cores / local_world_size().max(1)).max(1);
    }
    // Whether a core is left for each rank's communication thread (for the step prediction).
    let spare_core = cores > local_world_size().max(1) * cfg.train.threads;
    if a.grad_sync == GradSyncArg::Ps {
        let env = comm::JobEnv::from_env().context("joining the job")?;
        if env.world_size != a.dp + servers {
            bail!(
                "dp({}) + servers({servers}) = {}, but WORLD_SIZE is {}",
                a.dp,
                a.dp + servers,
                env.world_size
            );
        }
        let world = match env.transport {
            comm::Transport::Shm => comm::shm::connect(&env),
            _ => comm::tcp::connect(&env),
        }
        .context("joining the job")?;
        let mode = match a.staleness {
            Some(s) => comm::ps::PsMode::Async { staleness: s },
            None => comm::ps::PsMode::Sync,
        };
        return Ok(match Dp::parameter_server(world, servers, mode)? {
            Role::Worker(d) => {
                let (bytes, overlap) = a.buckets();
                Setup::Worker {
                    dp: Some(Arc::new(Mutex::new(d.with_buckets(bytes, overlap)))),
                    pipeline: None,
                }
            }
            Role::Server(s) => Setup::Server(s),
        });
    }
    let c = if mpi {
        mpi_world()?
    } else {
        comm::init_from_env().context("joining the job")?
    };
    if c.size() != a.dp * a.pp * a.tp {
        bail!(
            "dp({}) * tp({}) * pp({}) = {}, but the job has {} ranks ({})",
            a.dp,
            a.tp,
            a.pp,
            a.dp * a.pp * a.tp,
            c.size(),
            if mpirun { "mpirun -n" } else { "WORLD_SIZE" }
        );
    }
    let (bytes, overlap) = a.buckets();
    let ring = |g: Box<dyn comm::Communicator>| {
        Arc::new(Mutex::new(
            Dp::ring(g, zero)
                .with_buckets(bytes, overlap)
                .with_spare_core(spare_core),
        ))
    };
    if a.pp == 1 && a.tp == 1 {
        return Ok(Setup::Worker {
            dp: Some(ring(c)),
            pipeline: None,
        });
    }
    let shape = train::mesh::MeshShape {
        dp: a.dp,
        pp: a.pp,
        tp: a.tp,
        vpp: a.vpp,
    };
    let parts = train::mesh::partition(
        &mesh_model(cfg),
        (cfg.train.batch_size, cfg.model.seq_len),
        a.pp * a.vpp,
        a.pp_layers.as_deref(),
    )?;
    let schedule: Schedule = a
        .schedule
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--schedule: {e}"))?;
    let schedule = if a.vpp > 1 {
        Schedule::Interleaved
    } else {
        schedule
    };
    let (pipe, dp_group) =
        Pipeline::connect(c, shape, schedule, parts).context("forming the pipeline")?;
    let pipe = pipe.with_sequence_parallel(a.sequence_parallel);
    Ok(Setup::Worker {
        dp: (a.dp > 1).then(|| ring(dp_group)),
        pipeline: Some(Arc::new(Mutex::new(pipe))),
    })
}

/// Starts `dp` (+ servers) copies of this program with the same arguments under
/// `scaletrain launch` and waits for them.
pub fn launch_self(a: &DpArgs) -> Result<()> {
    let exe = std::env::current_exe().context("finding this program")?;
    let mut command = vec![exe.display().to_string()];
    command.extend(std::env::args().skip(1));
    let la = crate::launch::LaunchArgs {
        nproc_per_node: crate::launch::NprocPerNode::fixed(a.dp * a.pp * a.tp),
        nnodes: 1,
        node_rank: 0,
        master_addr: "127.0.0.1".into(),
        master_port: None,
        servers: if a.grad_sync == GradSyncArg::Ps {
            a.servers
        } else {
            0
        },
        transport: None,
        token: None,
        grace_secs: 3.0,
        command,
    };
    crate::launch::run(&la)
}

/// Passes on an error of a rank whose job has formed. Under MPI it first prints the error and
/// stops the whole job (`MPI_Abort`, exit status 2): MPI has no timeouts, so peers that did not
/// fail would otherwise wait in their next collective forever.
pub fn fail(e: anyhow::Error) -> anyhow::Error {
    #[cfg(feature = "mpi")]
    if comm::mpi_comm::is_running() {
        eprintln!("error: {e:#}");
        comm::mpi_comm::abort_job(2);
    }
    e
}

/// The report's per-rank step times (data parallel, rank 0: `train::straggler`).
pub fn rank_times_line(times: &[train::straggler::RankTimes]) -> Option<String> {
    if times.is_empty() {
        return None;
    }
    let ranks: Vec<String> = times
        .iter()
        .map(|r| {
            format!(
                "rank {} busy {:.1} / waiting {:.1}{}",
                r.rank,
                1e3 * r.busy_secs,
                1e3 * r.wait_secs,
                if r.named > 0 {
                    format!(" (named a straggler {} time(s))", r.named)
                } else {
                    String::new()
                }
            )
        })
        .collect();
    Some(format!(
        "  per-rank step time (mean ms per step): {}",
        ranks.join(" | ")
    ))
}
