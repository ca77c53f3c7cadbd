//! ZeRO-1/2 (Rajbhandari et al. 2020): which offset ranges of the flat buffer a rank holds the
//! optimizer state (and, stage 2, the reduced gradient) of, and the sharded optimizer step:
//! global norm from every rank's pieces, AdamW on the pieces, all-gather of the parameters.

use super::buckets::peer_wait;
use super::{dist, Dp, ZeroStage};
use crate::error::TrainError;
use comm::shard_range;
use kernels::adamw::{clip_factor, scale_inplace, sum_squares};
use kernels::Par;
use model::{AdamW, AdamWConfig, ParamLayout};
use std::ops::Range;
use std::time::Instant;

impl Dp {
    /// The offset ranges of the flat buffer whose optimizer state (`m`, `v`) this rank holds,
    /// in increasing order: `opt.m` / `opt.v` are these ranges concatenated. The whole buffer
    /// without ZeRO; under ZeRO-1/2 this rank's piece `shard_range(bucket, dp, rank)` of every
    /// gradient bucket (so each bucket is reduce-scattered as soon as backward finishes it).
    pub fn owned_ranges(&self, len: usize) -> Vec<Range<usize>> {
        if self.zero == ZeroStage::Off {
            return vec![0..len];
        }
        let whole = [0..len];
        let buckets: &[Range<usize>] = if self.buckets.is_empty() {
            &whole
        } else {
            assert_eq!(
                self.buckets.iter().map(|b| b.len()).sum::<usize>(),
                len,
                "owned_ranges: length vs the attached layout"
            );
            &self.buckets
        };
        let (n, r) = (self.size(), self.rank());
        let mut out: Vec<Range<usize>> = buckets
            .iter()
            .map(|b| {
                let p = shard_range(b.len(), n, r);
                b.start + p.start..b.start + p.end
            })
            .filter(|p| !p.is_empty())
            .collect();
        out.sort_by_key(|p| p.start);
        out
    }

    /// Takes this rank's optimizer state for a `len`-element model: `opt.m` and `opt.v` must
    /// already be [`Dp::owned_ranges`]`(len)` concatenated (a fresh zero state, or
    /// `checkpoint::load_ranges`); ZeRO-2 also allocates its gradient shard.
    pub fn shard_optimizer(&mut self, opt: &AdamW, len: usize) {
        let held: usize = self.owned_ranges(len).iter().map(|r| r.len()).sum();
        assert_eq!(
            opt.m.len(),
            held,
            "shard_optimizer: m is not this rank's ranges"
        );
        assert_eq!(
            opt.v.len(),
            held,
            "shard_optimizer: v is not this rank's ranges"
        );
        if self.zero == ZeroStage::Two {
            self.grad_shard = vec![0.0; opt.m.len()];
        }
    }

    /// Bytes this module holds beyond the trainer's buffers (ZeRO-2: the reduced gradient shard
    /// and the bucket buffers).
    pub fn extra_bytes(&self) -> u64 {
        4 * (self.grad_shard.len() + self.pool.elems()) as u64 + self.zero3_bytes()
    }

    /// The job's sum of squares from this rank's `partial`: every rank's f64 all-gathered and
    /// summed in rank order on every rank (so every rank gets the same bits).
    pub(super) fn global_sum_squares(&mut self, partial: f64) -> Result<f64, TrainError> {
        let n = self.size();
        let bits = partial.to_bits();
        let mut all = vec![0.0f32; 2 * n];
        let mine = shard_range(all.len(), n, self.rank());
        all[mine].copy_from_slice(&[
            f32::from_bits(bits as u32),
            f32::from_bits((bits >> 32) as u32),
        ]);
        let w0 = peer_wait(self.group.as_ref());
        let t1 = Instant::now();
        self.group
            .all_gather(&mut all)
            .map_err(dist("gathering the gradient norm"))?;
        self.comm_wait_secs += peer_wait(self.group.as_ref()) - w0;
        let total: f64 = (0..n)
            .map(|k| {
                f64::from_bits(
                    all[2 * k].to_bits() as u64 | (all[2 * k + 1].to_bits() as u64) << 32,
                )
            })
            .sum();
        let secs = t1.elapsed().as_secs_f64();
        self.comm_secs += secs;
        self.exposed_secs += secs;
        Ok(total)
    }
}

impl Dp {
    /// [`Dp::step`] under ZeRO-1/2.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn zero_step(
        &mut self,
        layout: &ParamLayout,
        params: &mut [f32],
        grads: &mut [f32],
        opt: &mut AdamW,
        cfg: &AdamWConfig,
        par: Par,
        mesh: super::MeshNorm<'_>,
        apply: &mut dyn FnMut(f64) -> Result<bool, TrainError>,
    ) -> Result<f64, TrainError> {
        // ZeRO: this rank's pieces of the reduced gradient, reduce-scattered in `backward`:
        // in place in `grads` (stage 1) or accumulated in the shard (stage 2).
        let len = if self.zero == ZeroStage::Two {
            self.len
        } else {
            grads.len()
        };
        let owned = self.owned_ranges(len);
        let zero2 = self.zero == ZeroStage::Two;
        let mut shard = std::mem::take(&mut self.grad_shard);
        let partial: f64 = if zero2 {
            shard_sum_squares(&owned, mesh.copies, &shard)
        } else if mesh.copies.is_empty() {
            owned.iter().map(|r| sum_squares(&grads[r.clone()])).sum()
        } else {
            // Only what this rank counts: its pieces less the copies another rank counts.
            let mut sq = 0.0f64;
            for r in &owned {
                for piece in subtract(r.clone(), mesh.copies) {
                    sq += sum_squares(&grads[piece]);
                }
            }
            sq
        };
        // Global norm: each rank's f64 sum of squares, combined in rank order on every rank.
        let total = self.global_sum_squares(partial)?;
        let t1 = Instant::now();
        let total = (mesh.combine)(total)?;
        let secs = t1.elapsed().as_secs_f64();
        self.comm_secs += secs;
        self.exposed_secs += secs;
        let norm = total.sqrt();
        if !apply(norm)? {
            // Skipped on every rank alike (the norm is global): drop the gradient pieces.
            shard.fill(0.0);
            self.grad_shard = shard;
            return Ok(norm);
        }
        if let Some(max_norm) = cfg.grad_clip {
            let factor = clip_factor(norm, max_norm);
            if zero2 {
                scale_inplace(&mut shard, factor);
            } else {
                owned
                    .iter()
                    .for_each(|r| scale_inplace(&mut grads[r.clone()], factor));
            }
        }
        opt.step += 1;
        let mut at = 0;
        for r in &owned {
            let k = r.len();
            model::adamw_update_range(
                layout,
                r.start,
                &mut params[r.clone()],
                &mut opt.m[at..at + k],
                &mut opt.v[at..at + k],
                if zero2 {
                    &shard[at..at + k]
                } else {
                    &grads[r.clone()]
                },
                cfg,
                opt.step,
                par,
            );
            at += k;
        }
        shard.fill(0.0);
        self.grad_shard = shard;
        let w0 = peer_wait(self.group.as_ref());
        let t2 = Instant::now();
        for b in self.bucket_list(len) {
            self.group
                .all_gather(&mut params[b])
                .map_err(dist("ZeRO parameter all-gather"))?;
        }
        self.comm_wait_secs += peer_wait(self.group.as_ref()) - w0;
        let secs = t2.elapsed().as_secs_f64();
        self.comm_secs += secs;
        self.exposed_secs += secs;
        Ok(norm)
    }
}

/// `r` less the (sorted, disjoint) ranges `holes`, in order.
/// Sum of squares of a gradient shard `shard` (this rank's owned ranges `owned`, concatenated:
/// ZeRO-2's and ZeRO-3's), less the tensors another rank counts (`copies`); the whole shard
/// at once when nothing is excluded.
pub(super) fn shard_sum_squares(
    owned: &[Range<usize>],
    copies: &[Range<usize>],
    shard: &[f32],
) -> f64 {
    if copies.is_empty() {
        return sum_squares(shard);
    }
    let mut at = 0;
    let mut sq = 0.0f64;
    for r in owned {
        for piece in subtract(r.clone(), copies) {
            sq += sum_squares(&shard[at + piece.start - r.start..at + piece.end - r.start]);
        }
        at += r.len();
    }
    sq
}

pub(crate) fn subtract(r: Range<usize>, holes: &[Range<usize>]) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut at = r.start;
    for h in holes {
        if h.end <= at || h.start >= r.end {
            continue;
        }
        if h.start > at {
            out.push(at..h.start);
        }
        at = at.max(h.end);
    }
    if at < r.end {
        out.push(at..r.end);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::*;

    #[test]
    fn subtract_leaves_the_pieces_outside_the_holes() {
        use super::subtract;
        assert_eq!(subtract(0..10, &[]), [0..10]);
        assert_eq!(subtract(0..10, &[2..4, 6..7]), [0..2, 4..6, 7..10]);
        assert_eq!(subtract(3..8, &[0..4, 7..20]), [4..7]);
        assert_eq!(subtract(3..8, &[0..20]), Vec::<Range<usize>>::new());
        assert_eq!(subtract(3..8, &[0..3, 8..9]), [3..8]);
    }
    use model::{ModelConfig, Shard};

    fn layout(n_layer: usize) -> ParamLayout {
        let cfg = ModelConfig {
            vocab_size: 50,
            max_seq_len: 8,
            n_layer,
            n_head: 2,
            channels: 16,
        };
        ParamLayout::new(&cfg, &Shard::full(&cfg)).unwrap()
    }

    #[test]
    fn zero_pieces_cover_every_element_once_across_ranks() {
        let l = layout(3);
        for n in 1..=4 {
            let comms = comm::threads(n, comm::Config::default());
            let mut seen = vec![0u8; l.len()];
            for c in comms {
                let mut d = Dp::ring(Box::new(c), ZeroStage::One).with_buckets(256, true);
                d.attach(&l);
                let owned = d.owned_ranges(l.len());
                assert!(owned.windows(2).all(|w| w[0].end <= w[1].start));
                for r in owned {
                    seen[r].iter_mut().for_each(|x| *x += 1);
                }
            }
            assert!(seen.iter().all(|&x| x == 1), "{n} ranks");
        }
    }
}
