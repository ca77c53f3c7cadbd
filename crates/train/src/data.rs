//! Training data in memory and deterministic batches.
//!
//! A token stream of N tokens is cut into W = ⌊(N − 1) / T⌋ windows of T + 1 tokens
//! (window w = tokens `w·T ..= w·T + T`; neighbours share one token), giving inputs x = the first
//! T and targets y = the last T. Each epoch visits every window once in an order drawn from
//! `(seed, epoch)` alone (Fisher–Yates with the kernels' SplitMix64), so the batch sequence is a
//! pure function of the seed, and the data position is just `(epoch, cursor)`: that pair is all
//! a checkpoint needs to continue the same sequence. Validation uses the first windows of the
//! validation stream, in order, every time.

use crate::config::{DataSource, TrainConfig};
use crate::error::TrainError;
use crate::synthetic::{self, MarkovSource};
use crate::tokens::read_tokens;
use kernels::rng::Rng;
use serde::{Deserialize, Serialize};

/// Train and validation streams plus what is known about them.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// Vocabulary size of the data (every id is below it).
    pub vocab_size: usize,
    /// Training tokens.
    pub train: Vec<u32>,
    /// Validation tokens.
    pub val: Vec<u32>,
    /// The generating source, for the synthetic corpus (gives the loss floor).
    pub source: Option<MarkovSource>,
}

impl Dataset {
    /// Loads token files or generates the synthetic corpus, as the config says.
    pub fn load(cfg: &TrainConfig) -> Result<Dataset, TrainError> {
        match cfg.data.source {
            DataSource::Synthetic => {
                let c = synthetic::generate(&cfg.data.synthetic);
                Ok(Dataset {
                    vocab_size: cfg.data.synthetic.vocab_size,
                    train: c.train,
                    val: c.val,
                    source: Some(c.source),
                })
            }
            DataSource::Files => {
                let (tp, vp) = match (&cfg.data.train_file, &cfg.data.val_file) {
                    (Some(t), Some(v)) => (t, v),
                    _ => {
                        return Err(TrainError::Data(
                            "data.train_file and data.val_file are required".into(),
                        ))
                    }
                };
                let t = read_tokens(tp)?;
                let v = read_tokens(vp)?;
                if t.vocab_size != v.vocab_size {
                    return Err(TrainError::Data(format!(
                        "{} has vocabulary {} but {} has {}",
                        tp.display(),
                        t.vocab_size,
                        vp.display(),
                        v.vocab_size
                    )));
                }
                Ok(Dataset {
                    vocab_size: t.vocab_size as usize,
                    train: t.tokens,
                    val: v.tokens,
                    source: None,
                })
            }
        }
    }

    /// The best achievable loss for windows of `seq_len` (synthetic corpus only).
    pub fn loss_floor(&self, seq_len: usize) -> Option<f64> {
        self.source.as_ref().map(|s| s.loss_floor(seq_len))
    }
}

/// Windows of `seq + 1` tokens in a stream of `n` tokens.
pub fn window_count(n: usize, seq: usize) -> usize {
    n.saturating_sub(1) / seq
}

/// Position in the batch sequence: everything needed to continue it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataPosition {
    /// Completed passes over the training windows.
    pub epoch: u64,
    /// Windows of this epoch already used.
    pub cursor: u64,
}

/// Deterministic shuffled batches over one token stream.
#[derive(Clone, Debug)]
pub struct Batcher {
    seq: usize,
    batch: usize,
    seed: u64,
    windows: usize,
    order: Vec<u32>,
    pos: DataPosition,
}

impl Batcher {
    /// A batcher at `pos`. Errors if the stream has fewer windows than one batch.
    pub fn new(
        n_tokens: usize,
        seq: usize,
        batch: usize,
        seed: u64,
        pos: DataPosition,
        what: &str,
    ) -> Result<Batcher, TrainError> {
        let windows = window_count(n_tokens, seq);
        if windows < batch {
            return Err(TrainError::Data(format!(
                "{what} has {n_tokens} tokens = {windows} windows of seq_len {seq} + 1, fewer than batch_size {batch}"
            )));
        }
        if pos.cursor as usize > windows {
            return Err(TrainError::Data(format!(
                "data position cursor {} is beyond the {windows} windows of {what}",
                pos.cursor
            )));
        }
        let mut b = Batcher {
            seq,
            batch,
            seed,
            windows,
            order: Vec::new(),
            pos,
        };
        b.shuffle();
        Ok(b)
    }

    fn shuffle(&mut self) {
        self.order = (0..self.windows as u32).collect();
        let mut rng = Rng::new(self.seed ^ 0x0BA7_C4E5_u64.wrapping_mul(self.pos.epoch + 1));
        for i in (1..self.order.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            self.order.swap(i, j);
        }
    }

    /// Where the next batch starts.
    pub fn position(&self) -> DataPosition {
        self.pos
    }

    /// Fills `x` and `y` (each batch·seq) with the next batch and advances. An epoch's leftover
    /// windows (fewer than a batch) are skipped; the next epoch reshuffles.
    pub fn next_batch(&mut self, tokens: &[u32], x: &mut [u32], y: &mut [u32]) {
        if self.pos.cursor as usize + self.batch > self.windows {
            self.pos = DataPosition {
                epoch: self.pos.epoch + 1,
                cursor: 0,
            };
            self.shuffle();
        }
        let t = self.seq;
        for i in 0..self.batch {
            let w = self.order[self.pos.cursor as usize + i] as usize;
            let win = &tokens[w * t..w * t + t + 1];
            x[i * t..(i + 1) * t].copy_from_slice(&win[..t]);
            y[i * t..(i + 1) * t].copy_from_slice(&win[1..]);
        }
        self.pos.cursor += self.batch as u64;
    }
}

/// The `k`-th validation batch (in order, no shuffling); `None` past the end of the stream.
pub fn val_batch(
    tokens: &[u32],
    seq: usize,
    batch: usize,
    k: usize,
    x: &mut [u32],
    y: &mut [u32],
) -> bool {
    if (k + 1) * batch > window_count(tokens.len(), seq) {
        return false;
    }
    for i in 0..batch {
        let w = k * batch + i;
        let win = &tokens[w * seq..w * seq + seq + 1];
        x[i * seq..(i + 1) * seq].copy_from_slice(&win[..seq]);
        y[i * seq..(i + 1) * seq].copy_from_slice(&win[1..]);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_deterministic_cover_each_epoch_and_reshuffle() {
        let toks: Vec<u32> = (0..161).collect(); // 40 windows of 4 + 1
        let (seq, batch) = (4, 5);
        let mut a = Batcher::new(toks.len(), seq, batch, 9, DataPosition::default(), "t").unwrap();
        let (mut x, mut y) = (vec![0; 20], vec![0; 20]);
        let mut epoch0 = Vec::new();
        for _ in 0..8 {
            a.next_batch(&toks, &mut x, &mut y);
            assert!(x.iter().zip(&y).all(|(a, b)| b == &(a + 1)));
            epoch0.extend(x.chunks(4).map(|c| c[0]));
        }
        let mut sorted = epoch0.clone();
        sorted.sort();
        assert_eq!(sorted, (0..40).map(|w| w * 4).collect::<Vec<_>>());
        assert_ne!(sorted, epoch0, "shuffled");
        // Continuing from a saved position gives the same batches as not stopping.
        let saved = a.position();
        let mut b = Batcher::new(toks.len(), seq, batch, 9, saved, "t").unwrap();
        let (mut x2, mut y2) = (vec![0; 20], vec![0; 20]);
        a.next_batch(&toks, &mut x, &mut y);
        b.next_batch(&toks, &mut x2, &mut y2);
        assert_eq!((x.clone(), y), (x2, y2));
        assert_eq!(a.position().epoch, 1);
        let first_of_epoch1: Vec<u32> = x.chunks(4).map(|c| c[0]).collect();
        assert_ne!(first_of_epoch1, epoch0[..5], "each epoch reshuffles");
        let e = Batcher::new(20, 4, 5, 1, DataPosition::default(), "train.tok").unwrap_err();
        assert!(e.to_string().contains("fewer than batch_size 5"), "{e}");
    }
}
