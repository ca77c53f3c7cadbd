//! `scaletrain bench comm`: latency, algorithm bandwidth and bus bandwidth of all-reduce per message
//! size, with nccl-tests' definitions: algbw = bytes / time, busbw = algbw · 2(n-1)/n.
//!
//! The parent starts `--nproc` copies of this program as the ranks (like `scaletrain launch`), or
//! runs them as threads with `--transport threads`; rank 0 measures and prints.
use anyhow::{bail, Context, Result};
use clap::Args;
use comm::ps::{serve, worker_step, PsLayout, PsMode};
use comm::{threads, Algorithm, Comm, Communicator, Config, ReduceOp};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Instant;

/// Flags of `scaletrain bench comm`.
#[derive(Debug, Args, Clone)]
pub struct BenchCommArgs {
    /// Ranks (workers; parameter servers come on top with --algo ps).
    #[arg(long, default_value_t = 2)]
    pub nproc: usize,
    /// threads, tcp, shm, or mpi (runs the ranks under `mpirun`; needs a `--features mpi` build).
    #[arg(long, default_value = "tcp")]
    pub transport: String,
    /// ring, tree, auto or ps (parameter server, synchronous).
    #[arg(long, default_value = "ring")]
    pub algo: String,
    /// Parameter servers for --algo ps.
    #[arg(long, default_value_t = 1)]
    pub servers: usize,
    /// With --algo ps: asynchronous mode, a worker may run this many steps ahead of the slowest
    /// (bounded staleness; workers then pull parameters, not a reduction). Default: synchronous.
    #[arg(long)]
    pub staleness: Option<usize>,
    /// Message sizes: `LO..HI` (multiplying by --factor) or a comma list; suffixes K, M, G (powers of 2).
    #[arg(long, default_value = "1K..256M")]
    pub sizes: String,
    /// Step between sizes of a `LO..HI` range.
    #[arg(long, default_value_t = 4)]
    pub factor: usize,
    /// Timed iterations per size (default: about 512 MiB of traffic per size, 5 to 2000).
    #[arg(long)]
    pub iters: Option<usize>,
    /// Print `{"results": [...]}` instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Internal: run as one rank of the benchmark (environment from the parent or mpirun).
    #[arg(long, hide = true)]
    pub worker: bool,
}

fn parse_size(s: &str) -> Result<usize> {
    let s = s.trim();
    let (num, mul) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let n: usize = num.parse().with_context(|| format!("bad size {s:?}"))?;
    Ok(n * mul)
}

/// The message sizes in bytes (multiples of 4).
pub fn sizes(spec: &str, factor: usize) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    if let Some((lo, hi)) = spec.split_once("..") {
        let (mut x, hi) = (parse_size(lo)?, parse_size(hi)?);
        if x == 0 || factor < 2 {
            bail!("a size range needs a start above 0 and --factor of at least 2");
        }
        while x <= hi {
            out.push(x);
            x *= factor;
        }
    } else {
        for p in spec.split(',') {
            out.push(parse_size(p)?);
        }
    }
    Ok(out.into_iter().map(|b| b / 4 * 4).collect())
}

fn iters_for(bytes: usize, fixed: Option<usize>) -> usize {
    fixed.unwrap_or_else(|| ((512usize << 20) / bytes.max(1)).clamp(5, 2000))
}

/// One row of the results.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Row {
    pub bytes: usize,
    pub algo: String,
    pub transport: String,
    pub nproc: usize,
    pub latency_us: f64,
    pub algbw_gbps: f64,
    pub busbw_gbps: f64,
}

/// Time `step` for every size on this rank; rows hold the slowest rank's time.
fn run_sizes<C: Communicator>(
    c: &mut C,
    a: &BenchCommArgs,
    sizes: &[usize],
    workers: usize,
    mut step: impl FnMut(&mut C, &mut [f32], usize) -> Result<()>,
) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for &bytes in sizes {
        let iters = iters_for(bytes, a.iters);
        let mut buf = vec![(c.rank() + 1) as f32; bytes / 4];
        step(c, &mut buf, 2.min(iters))?;
        c.barrier()?;
        let t0 = Instant::now();
        step(c, &mut buf, iters)?;
        let mut secs = [t0.elapsed().as_secs_f64() as f32 / iters as f32];
        c.all_reduce(&mut secs, ReduceOp::Max)?;
        let t = secs[0] as f64;
        let algbw = bytes as f64 / t / 1e9;
        rows.push(Row {
            bytes,
            algo: a.algo.clone(),
            transport: a.transport.clone(),
            nproc: workers,
            latency_us: t * 1e6,
            algbw_gbps: algbw,
            busbw_gbps: algbw * 2.0 * (workers as f64 - 1.0) / workers as f64,
        });
    }
    Ok(rows)
}

/// Measure on this rank over a built-in transport; rank 0 returns the rows.
fn measure(c: &mut Comm, a: &BenchCommArgs, sizes: &[usize]) -> Result<Vec<Row>> {
    if a.algo == "ps" {
        let layout = PsLayout::new(c.size(), a.servers)?;
        let mode = a
            .staleness
            .map_or(PsMode::Sync, |staleness| PsMode::Async { staleness });
        return run_sizes(c, a, sizes, layout.workers, |c, buf, iters| {
            if layout.is_server(c.rank()) {
                serve(c, &layout, mode, ReduceOp::Sum, buf.len(), iters)?;
            } else {
                for _ in 0..iters {
                    worker_step(c, &layout, buf)?;
                }
            }
            Ok(())
        });
    }
    c.set_algorithm(a.algo.parse::<Algorithm>().map_err(anyhow::Error::msg)?);
    let n = c.size();
    run_sizes(c, a, sizes, n, |c, buf, iters| {
        for _ in 0..iters {
            c.all_reduce(buf, ReduceOp::Sum)?;
        }
        Ok(())
    })
}

fn print(rows: &[Row], json: bool) -> Result<()> {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "results": rows }))?
        );
        return Ok(());
    }
    if let Some(r) = rows.first() {
        println!(
            "# all-reduce (sum, f32), {} ranks, transport {}, algo {}",
            r.nproc, r.transport, r.algo
        );
    }
    println!(
        "{:>12} {:>12} {:>12} {:>12}",
        "bytes", "latency_us", "algbw_GB/s", "busbw_GB/s"
    );
    for r in rows {
        println!(
            "{:>12} {:>12.1} {:>12.3} {:>12.3}",
            r.bytes, r.latency_us, r.algbw_gbps, r.busbw_gbps
        );
    }
    Ok(())
}

/// `scaletrain bench comm`.
pub fn run(a: &BenchCommArgs) -> Result<()> {
    let sizes = sizes(&a.sizes, a.factor)?;
    if !["ring", "tree", "auto", "ps"].contains(&a.algo.as_str()) {
        bail!("--algo {:?}: expected ring, tree, auto or ps", a.algo);
    }
    let world = a.nproc + if a.algo == "ps" { a.servers } else { 0 };
    if a.worker && a.transport == "mpi" {
        return run_mpi(a, &sizes);
    }
    if a.worker {
        let env = comm::JobEnv::from_env()?;
        let mut c = match env.transport {
            comm::Transport::Tcp => comm::tcp::connect(&env)?,
            comm::Transport::Shm => comm::shm::connect(&env)?,
            comm::Transport::Mpi => return run_mpi(a, &sizes),
        };
        let rows = measure(&mut c, a, &sizes)?;
        if c.rank() == 0 {
            println!("{}", serde_json::to_string(&rows)?);
        }
        return Ok(());
    }
    let rows = match a.transport.as_str() {
        "threads" => {
            let handles: Vec<_> = threads(world, Config::default())
                .into_iter()
                .map(|mut c| {
                    let (a, sizes) = (a.clone(), sizes.clone());
                    std::thread::spawn(move || measure(&mut c, &a, &sizes))
                })
                .collect();
            let mut rows = Vec::new();
            for (r, h) in handles.into_iter().enumerate() {
                let out = h
                    .join()
                    .map_err(|_| anyhow::anyhow!("rank {r} panicked"))??;
                if r == 0 {
                    rows = out;
                }
            }
            rows
        }
        "tcp" | "shm" => spawn_ranks(a, world)?,
        "mpi" => spawn_mpi(a)?,
        other => bail!("--transport {other:?}: expected threads, tcp, shm or mpi"),
    };
    print(&rows, a.json)
}

#[cfg(feature = "mpi")]
fn run_mpi(a: &BenchCommArgs, sizes: &[usize]) -> Result<()> {
    if a.algo == "ps" {
        bail!("--algo ps runs on the built-in transports only");
    }
    let mut c = comm::mpi_comm::MpiComm::init()?;
    let n = c.size();
    let rows = run_sizes(&mut c, a, sizes, n, |c, buf, iters| {
        for _ in 0..iters {
            c.all_reduce(buf, ReduceOp::Sum)?;
        }
        Ok(())
    })?;
    if c.rank() == 0 {
        println!("{}", serde_json::to_string(&rows)?);
    }
    Ok(())
}

#[cfg(not(feature = "mpi"))]
fn run_mpi(_: &BenchCommArgs, _: &[usize]) -> Result<()> {
    bail!("the MPI benchmark needs a build with `--features mpi`")
}

fn spawn_ranks(a: &BenchCommArgs, world: usize) -> Result<Vec<Row>> {
    let la = crate::launch::LaunchArgs {
        nproc_per_node: crate::launch::NprocPerNode::fixed(world),
        nnodes: 1,
        node_rank: 0,
        master_addr: "127.0.0.1".into(),
        master_port: None,
        servers: 0,
        transport: Some(a.transport.clone()),
        token: None,
        grace_secs: 1.0,
        command: vec!["-".into()],
    };
    let plan = crate::launch::plan(&la)?;
    let exe = std::env::current_exe().context("locating this program")?;
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    args.push("--worker".into());
    let mut children = Vec::new();
    for p in &plan.procs {
        let mut cmd = Command::new(&exe);
        cmd.args(&args)
            .envs(p.env.iter().map(|(k, v)| (k, v)))
            .stderr(Stdio::inherit());
        cmd.stdout(if p.rank == 0 {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        children.push(
            cmd.spawn()
                .with_context(|| format!("starting rank {}", p.rank))?,
        );
    }
    let out = children[0].stdout.take().context("rank 0 output")?;
    let rows = read_rows(out);
    let mut failed = Vec::new();
    for (r, c) in children.iter_mut().enumerate() {
        let s = c.wait()?;
        if !s.success() {
            failed.push(format!("rank {r}: {s}"));
        }
    }
    if !failed.is_empty() {
        bail!("benchmark ranks failed: {}", failed.join(", "));
    }
    rows
}

/// The rows rank 0 prints (one JSON array on one line).
fn read_rows(out: impl std::io::Read) -> Result<Vec<Row>> {
    let mut rows = None;
    for line in BufReader::new(out).lines() {
        let line = line?;
        if line.starts_with("[{") || line == "[]" {
            rows = Some(serde_json::from_str::<Vec<Row>>(&line)?);
        }
    }
    rows.context("rank 0 printed no results")
}

/// `--transport mpi`: run this program's ranks under `mpirun` (needs a `--features mpi` build).
fn spawn_mpi(a: &BenchCommArgs) -> Result<Vec<Row>> {
    let exe = std::env::current_exe().context("locating this program")?;
    let mut args: Vec<String> = vec![
        "--oversubscribe".into(),
        "-n".into(),
        a.nproc.to_string(),
        exe.display().to_string(),
    ];
    args.extend(std::env::args().skip(1));
    args.push("--worker".into());
    let mut child = Command::new("mpirun")
        .args(&args)
        .env("SCALETRAIN_TRANSPORT", "mpi")
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting mpirun (apt-get install openmpi-bin)")?;
    let rows = read_rows(child.stdout.take().context("mpirun output")?);
    let status = child.wait()?;
    if !status.success() {
        bail!("mpirun failed: {status}");
    }
    rows
}
