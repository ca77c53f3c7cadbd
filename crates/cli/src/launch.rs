//! `scaletrain launch`: start the processes of a job on this host with torchrun's environment,
//! prefix their output with their rank, and stop everything when one fails or on Ctrl-C; with
//! `--max-restarts N`, start them all again (`restart.rs`); with `--nproc-per-node MIN:MAX`,
//! go on with fewer ranks and grow back (`elastic.rs`).
use anyhow::{bail, Context, Result};
use clap::Args;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

pub mod elastic;
mod nproc;
pub mod restart;

pub use nproc::NprocPerNode;

/// Flags of `scaletrain launch`.
#[derive(Debug, Args, Clone)]
pub struct LaunchArgs {
    /// Worker processes on this node, or MIN:MAX (torchrun's form) for an elastic training job
    /// that goes on with fewer data-parallel ranks when one fails and grows back when its slot
    /// returns (needs --max-restarts; see docs/reliability.md).
    #[arg(long, default_value = "2")]
    pub nproc_per_node: NprocPerNode,
    /// Nodes in the job.
    #[arg(long, default_value_t = 1)]
    pub nnodes: usize,
    /// This node's index, 0..nnodes (node 0 runs rank 0 and the servers).
    #[arg(long, default_value_t = 0)]
    pub node_rank: usize,
    /// Host of rank 0 (node 0).
    #[arg(long, default_value = "127.0.0.1")]
    pub master_addr: String,
    /// Port of rank 0. Default: a free port on one node; required with --nnodes > 1.
    #[arg(long)]
    pub master_port: Option<u16>,
    /// Parameter-server processes, started on node 0 after the workers (ranks world-K..world-1).
    #[arg(long, default_value_t = 0)]
    pub servers: usize,
    /// Transport for the children (tcp or shm); sets SCALETRAIN_TRANSPORT.
    #[arg(long)]
    pub transport: Option<String>,
    /// Job token shared by every process. Default: SCALETRAIN_JOB_TOKEN, else a random one
    /// (one node only: several nodes must be given the same token).
    #[arg(long)]
    pub token: Option<String>,
    /// Seconds to wait after SIGTERM before SIGKILL when stopping the job.
    #[arg(long, default_value_t = 3.0)]
    pub grace_secs: f64,
    /// The command to run in every process (after `--`). Default: data-parallel training,
    /// `scaletrain train --dp <workers> --set train.batch_size=8` (ring all-reduce; with --servers,
    /// the parameter server), the single-process default's global batch of 16 sequences. Flags
    /// instead of a command are added to that default: `scaletrain launch -- --resume`,
    /// `-- --out runs/x --steps 100`.
    #[arg(last = true)]
    pub command: Vec<String>,
}

/// One process to start.
#[derive(Debug, Clone)]
pub struct Proc {
    /// World rank.
    pub rank: usize,
    /// Environment variables to set.
    pub env: Vec<(String, String)>,
}

/// The validated job: who runs here and with which environment.
#[derive(Debug, Clone)]
pub struct Plan {
    /// World size (workers + servers).
    pub world: usize,
    /// Processes of this node.
    pub procs: Vec<Proc>,
}

fn random_token() -> Result<String> {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .context("reading /dev/urandom for a job token")?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Check the flags and work out every local process's environment.
pub fn plan(a: &LaunchArgs) -> Result<Plan> {
    if a.nproc_per_node.is_elastic() {
        bail!(
            "--nproc-per-node {}: an elastic range is planned one size at a time (elastic::run)",
            a.nproc_per_node
        );
    }
    let nproc_per_node = a.nproc_per_node.max;
    if a.nnodes == 0 || a.node_rank >= a.nnodes {
        bail!(
            "--node-rank {} is not in 0..{} (--nnodes)",
            a.node_rank,
            a.nnodes
        );
    }
    let workers = a.nnodes * nproc_per_node;
    let world = workers + a.servers;
    let token = match (
        &a.token,
        std::env::var("SCALETRAIN_JOB_TOKEN")
            .ok()
            .filter(|t| !t.is_empty()),
    ) {
        (Some(t), _) => t.clone(),
        (None, Some(t)) => t,
        (None, None) if a.nnodes == 1 => random_token()?,
        (None, None) => bail!(
            "--nnodes {} needs the same --token (or SCALETRAIN_JOB_TOKEN) on every node",
            a.nnodes
        ),
    };
    let port = match a.master_port {
        Some(p) => p,
        None if a.nnodes == 1 => free_port()?,
        None => bail!(
            "--nnodes {} needs --master-port (the same on every node)",
            a.nnodes
        ),
    };
    let local_servers = if a.node_rank == 0 { a.servers } else { 0 };
    let local_world = nproc_per_node + local_servers;
    let mut procs = Vec::new();
    for local in 0..local_world {
        let (rank, role) = if local < nproc_per_node {
            (a.node_rank * nproc_per_node + local, "worker")
        } else {
            (workers + local - nproc_per_node, "server")
        };
        let mut env = vec![
            ("RANK".to_string(), rank.to_string()),
            ("LOCAL_RANK".into(), local.to_string()),
            ("WORLD_SIZE".into(), world.to_string()),
            ("LOCAL_WORLD_SIZE".into(), local_world.to_string()),
            ("GROUP_RANK".into(), a.node_rank.to_string()),
            ("MASTER_ADDR".into(), a.master_addr.clone()),
            ("MASTER_PORT".into(), port.to_string()),
            ("SCALETRAIN_JOB_TOKEN".into(), token.clone()),
            ("SCALETRAIN_ROLE".into(), role.into()),
            ("SCALETRAIN_NUM_SERVERS".into(), a.servers.to_string()),
        ];
        if let Some(t) = &a.transport {
            env.push(("SCALETRAIN_TRANSPORT".into(), t.clone()));
        }
        procs.push(Proc { rank, env });
    }
    Ok(Plan { world, procs })
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Threads copying children's output; join them (bounded) before exiting so no line is lost.
pub type Pumps = Vec<std::thread::JoinHandle<()>>;

/// Start `program args…` once per process of `plan`, prefixing output lines with `[rank r]`.
pub fn spawn(plan: &Plan, program: &str, args: &[String]) -> Result<(Vec<(usize, Child)>, Pumps)> {
    let mut children = Vec::new();
    let mut pumps = Vec::new();
    for p in &plan.procs {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .envs(p.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: prctl is async-signal-safe; the child dies with the launcher even on SIGKILL.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                stop_all(&mut children, Duration::ZERO);
                return Err(e).with_context(|| format!("starting rank {}: {program}", p.rank));
            }
        };
        let rank = p.rank;
        if let Some(out) = child.stdout.take() {
            pumps.push(std::thread::spawn(move || pump(out, rank, false)));
        }
        if let Some(err) = child.stderr.take() {
            pumps.push(std::thread::spawn(move || pump(err, rank, true)));
        }
        children.push((p.rank, child));
    }
    Ok((children, pumps))
}

/// Wait up to `limit` for the output threads (a grandchild may hold a pipe open forever).
pub fn drain(pumps: Pumps, limit: Duration) {
    let t = Instant::now();
    for p in pumps {
        while !p.is_finished() && t.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(5));
        }
        if p.is_finished() {
            let _ = p.join();
        }
    }
}

fn pump(r: impl std::io::Read, rank: usize, is_err: bool) {
    for line in BufReader::new(r).split(b'\n').map_while(Result::ok) {
        let text = String::from_utf8_lossy(&line);
        if is_err {
            let _ = writeln!(std::io::stderr().lock(), "[rank {rank}] {text}");
        } else {
            let _ = writeln!(std::io::stdout().lock(), "[rank {rank}] {text}");
        }
    }
}

fn describe(s: ExitStatus) -> String {
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(sig)) => format!(
            "was killed by signal {sig}{}",
            if sig == libc::SIGKILL {
                " (SIGKILL)"
            } else if sig == libc::SIGSEGV {
                " (SIGSEGV)"
            } else {
                ""
            }
        ),
        _ => "ended".into(),
    }
}

/// Whether process `pid` is stopped (SIGSTOP / SIGTSTP; state `T` in `/proc/PID/stat`).
fn is_stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('T')))
        .unwrap_or(false)
}

/// SIGTERM everyone still running (SIGKILL a stopped one), then SIGKILL after `grace`.
fn stop_all(children: &mut [(usize, Child)], grace: Duration) {
    for (_, c) in children.iter_mut() {
        if let Ok(None) = c.try_wait() {
            // A stopped (SIGSTOP) child would handle SIGTERM only once continued, and then
            // run on (and write a flight-recorder dump of calls made after the failure): it is
            // killed at once.
            let sig = if is_stopped(c.id()) {
                libc::SIGKILL
            } else {
                libc::SIGTERM
            };
            // SAFETY: signalling our own child by its pid.
            unsafe { libc::kill(c.id() as libc::pid_t, sig) };
        }
    }
    let t = Instant::now();
    while t.elapsed() < grace
        && children
            .iter_mut()
            .any(|(_, c)| matches!(c.try_wait(), Ok(None)))
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    for (_, c) in children.iter_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// How a job attempt ended ([`supervise`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every process exited with status 0.
    Done,
    /// Ctrl-C or SIGTERM: every process was stopped.
    Interrupted {
        /// Processes stopped.
        procs: usize,
    },
    /// The launcher asked every process to checkpoint and stop (SIGINT, to resize an elastic
    /// job), and every one exited with status 0.
    Paused,
    /// A process failed; the others were stopped.
    Failed {
        /// World rank of the first process seen failing.
        rank: usize,
        /// How it ended ("was killed by signal 9 (SIGKILL)").
        how: String,
        /// Processes still running when it failed (stopped since).
        others: usize,
    },
}

impl Outcome {
    /// The error message of a job that did not succeed.
    pub fn message(&self) -> String {
        match self {
            Outcome::Done => "every process exited with status 0".into(),
            Outcome::Paused => "every process checkpointed and stopped when asked".into(),
            Outcome::Interrupted { procs } => format!("interrupted: stopped all {procs} processes"),
            Outcome::Failed { rank, how, others } => {
                format!("rank {rank} {how}; stopped the other {others} running process(es)")
            }
        }
    }
}

/// Whether process `pid` has a handler for SIGINT (`SigCgt` in `/proc/PID/status`): the
/// trainer's, which checkpoints and stops at the next step.
fn catches_sigint(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            let hex = s
                .lines()
                .find_map(|l| l.strip_prefix("SigCgt:"))?
                .trim()
                .to_string();
            u64::from_str_radix(&hex, 16).ok()
        })
        .is_some_and(|mask| mask & (1 << (libc::SIGINT - 1)) != 0)
}

/// Wait for the job: [`Outcome::Done`] when every process exits 0; otherwise stop the rest
/// and say who failed.
/// With `ask_dumps`, the processes still running (and not stopped) are first sent SIGUSR1, so
/// that their flight recorders write what each was doing when the job failed.
/// `pause`: polled while the job runs; once it says so, every process is
/// sent SIGINT (as soon as all have their handler), so a training job writes a checkpoint and
/// stops; if all then exit 0, the outcome is [`Outcome::Paused`].
pub fn supervise_watched(
    mut children: Vec<(usize, Child)>,
    grace: Duration,
    ask_dumps: bool,
    mut pause: Option<&mut dyn FnMut() -> bool>,
) -> Result<Outcome> {
    let mut running: Vec<bool> = vec![true; children.len()];
    let mut pausing = false;
    let mut want_pause = false;
    loop {
        if !pausing {
            want_pause = want_pause || pause.as_mut().is_some_and(|f| f());
            if want_pause && children.iter().all(|(_, c)| catches_sigint(c.id())) {
                for (_, c) in &children {
                    // SAFETY: signalling our own child by its pid.
                    unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGINT) };
                }
                pausing = true;
            }
        }
        if STOP.load(Ordering::SeqCst) {
            stop_all(&mut children, grace);
            return Ok(Outcome::Interrupted {
                procs: children.len(),
            });
        }
        let mut failed = None;
        for (i, (rank, c)) in children.iter_mut().enumerate() {
            if !running[i] {
                continue;
            }
            if let Some(status) = c.try_wait().context("waiting for a child")? {
                running[i] = false;
                if !status.success() {
                    failed = Some((*rank, status));
                    break;
                }
            }
        }
        if let Some((mut rank, mut status)) = failed {
            // A peer of a killed rank often notices and exits with an error first (a
            // shared-memory peer sees the process die before its parent can reap it): give
            // the others up to 100 ms, and name the one a signal ended, the likelier culprit.
            let until = Instant::now() + Duration::from_millis(100);
            loop {
                for (i, (r, c)) in children.iter_mut().enumerate() {
                    if running[i] {
                        if let Ok(Some(s)) = c.try_wait() {
                            running[i] = false;
                            if s.signal().is_some() && status.signal().is_none() {
                                (rank, status) = (*r, s);
                            }
                        }
                    }
                }
                if status.signal().is_some()
                    || running.iter().all(|r| !r)
                    || Instant::now() >= until
                {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            let others = running.iter().filter(|r| **r).count();
            if ask_dumps && others > 0 {
                for (i, (_, c)) in children.iter().enumerate() {
                    // Not a stopped one: its dump would come after it is continued, showing
                    // calls made after the failure.
                    if running[i] && !is_stopped(c.id()) {
                        // SAFETY: signalling our own child by its pid.
                        unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGUSR1) };
                    }
                }
                // The recorders' threads look for the signal every 20 ms.
                std::thread::sleep(Duration::from_millis(200));
            }
            stop_all(&mut children, grace);
            return Ok(Outcome::Failed {
                rank,
                how: describe(status),
                others,
            });
        }
        if running.iter().all(|r| !r) {
            return Ok(if pausing {
                Outcome::Paused
            } else {
                Outcome::Done
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether Ctrl-C or SIGTERM asked the launcher to stop.
pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Install the Ctrl-C / SIGTERM handler that stops the whole job.
pub fn install_signal_handlers() {
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

/// `scaletrain launch` as the command line gives it: the job, and what to do when it fails.
#[derive(Debug, Args, Clone)]
pub struct LaunchCmd {
    /// Restarting a failed job.
    #[command(flatten)]
    pub restart: restart::RestartArgs,
    /// The job.
    #[command(flatten)]
    pub job: LaunchArgs,
}

/// `scaletrain launch` with its restart flags.
pub fn run_cmd(c: &LaunchCmd) -> Result<()> {
    run_with(&c.job, &c.restart)
}

/// `scaletrain launch` without restarts (a failed process fails the job).
pub fn run(a: &LaunchArgs) -> Result<()> {
    run_with(a, &restart::RestartArgs::default())
}

/// Fills in the default training command (and passes flags after `--` on to it).
fn with_command(a: &LaunchArgs) -> Result<LaunchArgs> {
    let mut a = a.clone();
    // `launch -- --resume --out runs/x`: flags (not a program) after `--` go to the default
    // training command.
    let train_flags = if a.command.first().is_some_and(|w| w.starts_with('-')) {
        std::mem::take(&mut a.command)
    } else {
        Vec::new()
    };
    if let Some(f) = train_flags
        .iter()
        .find(|f| ["--dp", "--grad-sync", "--servers"].contains(&f.split('=').next().unwrap_or(f)))
    {
        bail!(
            "{f} after `--`: launch sets it for its training command (--nproc-per-node, --servers); \
             to choose it yourself give the whole command: scaletrain launch -- scaletrain train --dp N …"
        );
    }
    if a.command.is_empty() {
        let exe = std::env::current_exe().context("finding this program")?;
        a.command = vec![exe.display().to_string(), "train".into()];
        a.command
            .extend(["--dp", &(a.nnodes * a.nproc_per_node.max).to_string()].map(String::from));
        if a.servers > 0 {
            a.command.extend(
                ["--grad-sync", "ps", "--servers", &a.servers.to_string()].map(String::from),
            );
        }
        a.command
            .extend(["--set", "train.batch_size=8", "--via-launch"].map(String::from));
        a.command.extend(train_flags);
    }
    Ok(a)
}

/// One attempt: start every process of `a` (restart number `attempt` in their environment),
/// wait for them, and say how it ended; `pause` as in [`supervise_watched`].
fn attempt(
    a: &LaunchArgs,
    attempt: usize,
    max_restarts: usize,
    pause: Option<&mut dyn FnMut() -> bool>,
) -> Result<Outcome> {
    let mut plan = plan(a)?;
    // A training job: every process (parameter servers too) records its calls and dumps them
    // into the run folder on an error or SIGUSR1, unless told otherwise.
    let train = restart::TrainJob::detect(&a.command);
    let flight_dir = train
        .as_ref()
        .filter(|_| std::env::var_os("SCALETRAIN_FLIGHT_DIR").is_none())
        .map(|t| t.out.display().to_string());
    for p in &mut plan.procs {
        if let Some(d) = &flight_dir {
            p.env.push(("SCALETRAIN_FLIGHT_DIR".into(), d.clone()));
        }
        for (k, v) in [
            ("SCALETRAIN_RESTART_COUNT", attempt),
            ("TORCHELASTIC_RESTART_COUNT", attempt),
            ("TORCHELASTIC_MAX_RESTARTS", max_restarts),
        ] {
            p.env.push((k.into(), v.to_string()));
        }
    }
    let (program, args) = a
        .command
        .split_first()
        .context("no command given after --")?;
    eprintln!(
        "scaletrain launch: starting {} of {} process(es){}: {}",
        plan.procs.len(),
        plan.world,
        if attempt > 0 {
            format!(" (restart {attempt} of at most {max_restarts})")
        } else {
            String::new()
        },
        a.command.join(" ")
    );
    let (children, pumps) = spawn(&plan, program, args)?;
    let out = supervise_watched(
        children,
        Duration::from_secs_f64(a.grace_secs.max(0.0)),
        train.is_some(),
        pause,
    );
    drain(pumps, Duration::from_secs(2));
    // Shared memory: rank 0 unlinks the job's file once every rank has joined; a rank that
    // died before that leaves it behind.
    let shm = a.transport.as_deref() == Some("shm")
        || (a.transport.is_none()
            && std::env::var("SCALETRAIN_TRANSPORT").is_ok_and(|t| t == "shm"));
    if shm && a.nnodes == 1 {
        let port = plan.procs[0]
            .env
            .iter()
            .find(|(k, _)| k == "MASTER_PORT")
            .and_then(|(_, v)| v.parse().ok());
        if let Some(port) = port {
            let _ = std::fs::remove_file(comm::shm::job_file(&a.master_addr, port));
        }
    }
    out
}

/// `scaletrain launch`: run the job; when a process fails, restart every process up to
/// `r.max_restarts` times (a training command resumes from the newest checkpoint it published).
pub fn run_with(a: &LaunchArgs, r: &restart::RestartArgs) -> Result<()> {
    r.check()?;
    let mut a = with_command(a)?;
    if a.nproc_per_node.is_elastic() {
        return elastic::run(&a, r);
    }
    install_signal_handlers();
    let mut sup = restart::Supervisor::new(&a.command, r);
    loop {
        let outcome = attempt(&a, sup.restarts(), r.max_restarts, None)?;
        match sup.next(&outcome)? {
            None => return Ok(()),
            Some(command) => a.command = command,
        }
    }
}
