//! The parameter-server role (`comm::ps`): which processes serve, the workers' push/pull step
//! (synchronous, or stale-synchronous with bounded staleness), and the servers' loop.

use super::{dist, Dp, ZeroStage};
use crate::error::TrainError;
use comm::ps::{PsLayout, PsMode};
use comm::{Comm, Communicator, ReduceOp};
use kernels::adamw::scale_inplace;
use kernels::Par;
use model::{AdamW, AdamWConfig, ParamLayout};
use std::time::Instant;

/// What a process of a parameter-server job is.
// One value per process, matched once at start-up: the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Role {
    /// A training worker.
    Worker(Dp),
    /// A server: call [`PsServer::serve`].
    Server(PsServer),
}

/// A parameter-server process.
pub struct PsServer {
    world: Comm,
    layout: PsLayout,
    mode: PsMode,
}

impl Dp {
    /// Parameter-server data parallelism over the world `comm`: the last `servers` ranks serve
    /// (collective over the world: every rank calls it).
    ///
    /// `PsMode::Async { staleness }`: stale-synchronous training (Ho et al. 2013). Each worker
    /// runs AdamW locally on its own gradients, pushes its weight change divided by the number of
    /// workers, and pulls θ, the servers' running sum of every pushed change; its weights become
    /// `w0 + θ`. A worker may run `staleness` steps ahead of the slowest. Not reproducible run
    /// to run, the workers' weights differ, and the reported loss is rank 0's own micro-batches.
    pub fn parameter_server(
        mut world: Comm,
        servers: usize,
        mode: PsMode,
    ) -> Result<Role, TrainError> {
        let layout = PsLayout::new(world.size(), servers).map_err(dist("parameter server"))?;
        let me = world.rank();
        let server = layout.is_server(me);
        let group = world
            .split(u32::from(server), me as u32)
            .map_err(dist("parameter server split"))?;
        if server {
            drop(group);
            return Ok(Role::Server(PsServer {
                world,
                layout,
                mode,
            }));
        }
        Ok(Role::Worker(Dp {
            ps: Some((world, layout)),
            async_base: matches!(mode, PsMode::Async { .. }).then(Vec::new),
            ..Dp::ring(group, ZeroStage::Off)
        }))
    }

    /// In parameter-server mode, rank 0 tells each server the buffer length and the steps.
    pub fn announce(&mut self, len: usize, steps: u64) -> Result<(), TrainError> {
        let Some((world, layout)) = &mut self.ps else {
            return Ok(());
        };
        if world.rank() == 0 {
            let mut msg = [0u8; 16];
            msg[..8].copy_from_slice(&(len as u64).to_le_bytes());
            msg[8..].copy_from_slice(&steps.to_le_bytes());
            for s in 0..layout.servers {
                world
                    .send(layout.workers + s, &msg)
                    .map_err(dist("telling the parameter servers the job"))?;
            }
        }
        Ok(())
    }
}

impl PsServer {
    /// Serves the whole run: waits for rank 0's announcement of the buffer length and step
    /// count, then serves every step synchronously (sum). Returns the steps served.
    pub fn serve(&mut self) -> Result<u64, TrainError> {
        let mut msg = [0u8; 16];
        self.world
            .recv(0, &mut msg)
            .map_err(dist("waiting for the job from rank 0"))?;
        let len = u64::from_le_bytes(msg[..8].try_into().expect("8 bytes")) as usize;
        let steps = u64::from_le_bytes(msg[8..].try_into().expect("8 bytes"));
        comm::ps::serve(
            &mut self.world,
            &self.layout,
            self.mode,
            ReduceOp::Sum,
            len,
            steps as usize,
        )
        .map_err(dist("parameter server"))?;
        Ok(steps)
    }
}

impl Dp {
    /// [`Dp::step`] for parameter-server workers: push this rank's gradients, pull the sum
    /// (synchronous), then AdamW as every rank does; or, asynchronous, AdamW on the own gradients
    /// first and push/pull the weight change.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn ps_step(
        &mut self,
        layout: &ParamLayout,
        params: &mut [f32],
        grads: &mut [f32],
        opt: &mut AdamW,
        cfg: &AdamWConfig,
        par: Par,
        apply: &mut dyn FnMut(f64) -> Result<bool, TrainError>,
    ) -> Result<f64, TrainError> {
        let t0 = Instant::now();
        let Some((world, ps)) = &mut self.ps else {
            return Ok(opt.step(layout, params, grads, cfg, par));
        };
        if let Some(base) = &self.async_base {
            let w = ps.workers as f32;
            // grads were scaled for a sum over workers: this rank's own mean is w times them.
            scale_inplace(grads, w);
            let before = params.to_vec();
            // Asynchronous: this worker's own gradient decides (a skipped step pushes no change).
            let norm = AdamW::grad_norm(grads);
            let norm = if apply(norm)? {
                opt.step(layout, params, grads, cfg, par)
            } else {
                norm
            };
            let t1 = Instant::now();
            for (g, (p, b)) in grads.iter_mut().zip(params.iter().zip(&before)) {
                *g = (p - b) / w;
            }
            comm::ps::worker_step(world, ps, grads)
                .map_err(dist("asynchronous parameter-server push/pull"))?;
            for (p, (b, theta)) in params.iter_mut().zip(base.iter().zip(grads.iter())) {
                *p = b + theta;
            }
            let secs = t1.elapsed().as_secs_f64();
            self.comm_secs += secs;
            self.exposed_secs += secs;
            return Ok(norm);
        }
        comm::ps::worker_step(world, ps, grads)
            .map_err(dist("parameter-server gradient push/pull"))?;
        let secs = t0.elapsed().as_secs_f64();
        self.comm_secs += secs;
        self.exposed_secs += secs;
        let norm = AdamW::grad_norm(grads);
        if !apply(norm)? {
            return Ok(norm);
        }
        Ok(opt.step(layout, params, grads, cfg, par))
    }
}
