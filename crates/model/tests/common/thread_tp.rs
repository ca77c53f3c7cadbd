//! Tensor-parallel collectives among threads, for tests (the real ones live in `comm`).
//! Include with `#[path = "common/thread_tp.rs"] mod thread_tp;`.
#![allow(dead_code)]

use model::{shard_range, TpError, TpReduce};
use std::ops::Range;
use std::sync::{Arc, Barrier, Mutex};

/// One rank of a group of threads: every rank posts its buffer, then each computes the result
/// from all posts in rank order, so every rank gets the same bits.
pub struct ThreadTp {
    shared: Arc<(Mutex<Vec<Vec<f32>>>, Barrier)>,
    rank: usize,
    size: usize,
}

impl ThreadTp {
    /// The `size` ranks of a new group, rank order.
    pub fn group(size: usize) -> Vec<ThreadTp> {
        let shared = Arc::new((Mutex::new(vec![Vec::new(); size]), Barrier::new(size)));
        (0..size)
            .map(|rank| ThreadTp {
                shared: shared.clone(),
                rank,
                size,
            })
            .collect()
    }

    /// Posts `buf`, waits for all, then sets `buf[i] = fold(post_0[i], …, post_{n-1}[i])` for
    /// `i` in `out`.
    fn exchange(&mut self, buf: &mut [f32], out: Range<usize>, fold: fn(f32, f32) -> f32) {
        let (posts, barrier) = &*self.shared;
        posts.lock().unwrap()[self.rank] = buf.to_vec();
        barrier.wait();
        {
            let posts = posts.lock().unwrap();
            for i in out {
                buf[i] = posts[1..].iter().fold(posts[0][i], |a, p| fold(a, p[i]));
            }
        }
        barrier.wait();
    }
}

impl TpReduce for ThreadTp {
    fn size(&self) -> usize {
        self.size
    }
    fn rank(&self) -> usize {
        self.rank
    }
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), TpError> {
        self.exchange(buf, 0..buf.len(), |a, b| a + b);
        Ok(())
    }
    fn all_reduce_max(&mut self, buf: &mut [f32]) -> Result<(), TpError> {
        self.exchange(buf, 0..buf.len(), f32::max);
        Ok(())
    }
    fn reduce_scatter_sum(&mut self, buf: &mut [f32]) -> Result<(), TpError> {
        let mine = shard_range(buf.len(), self.size, self.rank);
        self.exchange(buf, mine, |a, b| a + b);
        Ok(())
    }
    fn all_gather(&mut self, buf: &mut [f32]) -> Result<(), TpError> {
        let (posts, barrier) = &*self.shared;
        posts.lock().unwrap()[self.rank] = buf.to_vec();
        barrier.wait();
        {
            let posts = posts.lock().unwrap();
            for (r, post) in posts.iter().enumerate() {
                let sr = shard_range(buf.len(), self.size, r);
                buf[sr.clone()].copy_from_slice(&post[sr]);
            }
        }
        barrier.wait();
        Ok(())
    }
}

/// Runs `f(rank, collectives)` on `tp` threads, one per rank of a new group, and returns the
/// results in rank order.
pub fn run_group<R: Send>(tp: usize, f: impl Fn(usize, &mut ThreadTp) -> R + Sync) -> Vec<R> {
    std::thread::scope(|s| {
        let f = &f;
        let handles: Vec<_> = ThreadTp::group(tp)
            .into_iter()
            .enumerate()
            .map(|(rank, mut tp)| s.spawn(move || f(rank, &mut tp)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}
