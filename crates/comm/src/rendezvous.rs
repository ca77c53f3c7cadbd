//! Joining a job from the environment torchrun, Slurm wrappers and `scaletrain launch` set.
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `RANK` | this process's rank, `0..WORLD_SIZE` | required |
//! | `WORLD_SIZE` | number of processes | required |
//! | `LOCAL_RANK`, `LOCAL_WORLD_SIZE` | rank / count on this host | `RANK`, `WORLD_SIZE` |
//! | `MASTER_ADDR`, `MASTER_PORT` | where rank 0 listens | `127.0.0.1`, required when `WORLD_SIZE` > 1 |
//! | `SCALETRAIN_JOB_TOKEN` | shared secret; a process without it cannot join | required when `WORLD_SIZE` > 1 |
//! | `SCALETRAIN_BIND_ADDR` | address this process listens on (`0.0.0.0` across hosts) | `127.0.0.1` |
//! | `SCALETRAIN_TRANSPORT` | `tcp`, `shm` (one host) or `mpi` (feature `mpi`) | `tcp` |
//! | `SCALETRAIN_COMM_TIMEOUT_SECS` | [`crate::Config::timeout`] | 60 |
//! | `SCALETRAIN_COMM_SPIN_US` | [`crate::Config::spin`] (poll before sleeping) | 1000 |
use crate::error::{CommError, Result};
use crate::{Communicator, Config};
use std::net::IpAddr;

/// Which transport `init_from_env` builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// TCP sockets (any hosts).
    Tcp,
    /// Shared memory (all ranks on one host).
    Shm,
    /// MPI (feature `mpi`); rank and size come from MPI itself.
    Mpi,
}

impl std::str::FromStr for Transport {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "tcp" => Ok(Transport::Tcp),
            "shm" => Ok(Transport::Shm),
            "mpi" => Ok(Transport::Mpi),
            _ => Err(format!(
                "unknown transport {s:?} (expected tcp, shm or mpi)"
            )),
        }
    }
}

/// The job as the environment describes it, validated.
#[derive(Clone, Debug)]
pub struct JobEnv {
    /// World rank.
    pub rank: usize,
    /// World size.
    pub world_size: usize,
    /// Rank on this host.
    pub local_rank: usize,
    /// Ranks on this host.
    pub local_world_size: usize,
    /// Rank 0's host.
    pub master_addr: String,
    /// Rank 0's port.
    pub master_port: u16,
    /// Shared secret.
    pub token: Vec<u8>,
    /// Address to listen on.
    pub bind_addr: IpAddr,
    /// Transport to build.
    pub transport: Transport,
    /// Engine settings.
    pub cfg: Config,
}

fn var(name: &'static str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn parse<T: std::str::FromStr>(name: &'static str, v: Option<String>) -> Result<Option<T>> {
    match v {
        None => Ok(None),
        Some(s) => s.trim().parse().map(Some).map_err(|_| CommError::Env {
            var: name,
            detail: format!("{s:?} does not parse"),
        }),
    }
}

impl JobEnv {
    /// Read and check the variables in the table above.
    pub fn from_env() -> Result<JobEnv> {
        let rank: usize = parse("RANK", var("RANK"))?.ok_or(CommError::Env {
            var: "RANK",
            detail: "not set".into(),
        })?;
        let world_size: usize = parse("WORLD_SIZE", var("WORLD_SIZE"))?.ok_or(CommError::Env {
            var: "WORLD_SIZE",
            detail: "not set".into(),
        })?;
        if world_size == 0 || rank >= world_size {
            return Err(CommError::Env {
                var: "RANK",
                detail: format!("rank {rank} is not in 0..{world_size} (WORLD_SIZE)"),
            });
        }
        let local_rank = parse("LOCAL_RANK", var("LOCAL_RANK"))?.unwrap_or(rank);
        let local_world_size =
            parse("LOCAL_WORLD_SIZE", var("LOCAL_WORLD_SIZE"))?.unwrap_or(world_size);
        let master_addr = var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
        let master_port: Option<u16> = parse("MASTER_PORT", var("MASTER_PORT"))?;
        let token = var("SCALETRAIN_JOB_TOKEN").map(String::into_bytes);
        let bind_addr = parse("SCALETRAIN_BIND_ADDR", var("SCALETRAIN_BIND_ADDR"))?
            .unwrap_or(IpAddr::from([127, 0, 0, 1]));
        let transport = match var("SCALETRAIN_TRANSPORT") {
            None => Transport::Tcp,
            Some(s) => s.parse().map_err(|detail| CommError::Env {
                var: "SCALETRAIN_TRANSPORT",
                detail,
            })?,
        };
        let multi = world_size > 1 && transport != Transport::Mpi;
        let master_port = match master_port {
            Some(p) => p,
            None if !multi => 0,
            None => {
                return Err(CommError::Env {
                    var: "MASTER_PORT",
                    detail: "not set".into(),
                })
            }
        };
        let token = match token {
            Some(t) if t.len() <= 1024 => t,
            Some(t) => return Err(CommError::Env { var: "SCALETRAIN_JOB_TOKEN", detail: format!("{} bytes is longer than 1024", t.len()) }),
            None if !multi => Vec::new(),
            None => return Err(CommError::Env { var: "SCALETRAIN_JOB_TOKEN", detail: "not set: every process of a job must present the same token (scaletrain launch sets one)".into() }),
        };
        Ok(JobEnv {
            rank,
            world_size,
            local_rank,
            local_world_size,
            master_addr,
            master_port,
            token,
            bind_addr,
            transport,
            cfg: Config::from_env()?,
        })
    }
}

/// Join the job described by the environment over the transport it names.
pub fn init_from_env() -> Result<Box<dyn Communicator>> {
    #[cfg(feature = "mpi")]
    if var("SCALETRAIN_TRANSPORT").as_deref() == Some("mpi") {
        // Under mpirun the rank and size come from MPI, not from RANK / WORLD_SIZE.
        return Ok(Box::new(crate::mpi_comm::MpiComm::init()?));
    }
    let env = JobEnv::from_env()?;
    match env.transport {
        Transport::Tcp => Ok(Box::new(crate::tcp::connect(&env)?)),
        Transport::Shm => Ok(Box::new(crate::shm::connect(&env)?)),
        #[cfg(feature = "mpi")]
        Transport::Mpi => Ok(Box::new(crate::mpi_comm::MpiComm::init()?)), // (reached only if RANK is set too)
        #[cfg(not(feature = "mpi"))]
        Transport::Mpi => Err(CommError::Env {
            var: "SCALETRAIN_TRANSPORT",
            detail: "mpi needs a build with `--features mpi`".into(),
        }),
    }
}
