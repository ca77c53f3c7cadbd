//! placeholder
use crate::{comm::Comm, error::Result, rendezvous::JobEnv};
/// Not yet.
pub fn connect(env: &JobEnv) -> Result<Comm> {
    Err(crate::CommError::Unsupported {
        rank: env.rank,
        op: "init",
        transport: "shm",
    })
}
