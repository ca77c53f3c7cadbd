//! What the data-parallel ranks agree on before and during a run: the config/data fingerprint,
//! identical initial weights, the start step, the per-step losses and stop requests, and byte
//! strings of any length (e.g. what each rank wrote into a checkpoint).

use super::{dist, Dp};
use crate::error::TrainError;
use comm::{shard_range, Communicator};
use sha2::{Digest, Sha256};

/// `bytes` as `f32` bit patterns, 4 bytes each (the last word zero-padded).
pub(super) fn bytes_to_words(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks(4)
        .map(|c| {
            let mut w = [0u8; 4];
            w[..c.len()].copy_from_slice(c);
            f32::from_bits(u32::from_le_bytes(w))
        })
        .collect()
}

pub(super) fn bytemuck_bytes(xs: &[f32]) -> Vec<u8> {
    xs.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// What [`Dp::gather_losses`] brings back.
#[derive(Debug, Clone, PartialEq)]
pub struct Gathered {
    /// Every rank's per-micro-batch losses, rank 0's first.
    pub losses: Vec<f32>,
    /// Whether any rank was asked to stop.
    pub any_stop: bool,
    /// Every rank's busy seconds of the step, in rank order (`None`: asynchronous workers).
    pub busy_secs: Option<Vec<f32>>,
}

/// All-gathers a 32-byte digest from every rank of `group`; returns the ranks whose digest
/// differs from rank 0's. The data-parallel group's and the mesh's start checks share it.
pub fn differing_ranks(
    group: &mut dyn Communicator,
    digest: &[u8; 32],
) -> Result<Vec<usize>, comm::CommError> {
    let n = group.size();
    let words = bytes_to_words(digest);
    let mut all = vec![0.0f32; 8 * n];
    let mine = shard_range(all.len(), n, group.rank());
    all[mine].copy_from_slice(&words);
    group.all_gather(&mut all)?;
    let of = |r: usize| -> Vec<u32> { all[8 * r..8 * r + 8].iter().map(|x| x.to_bits()).collect() };
    let root = of(0);
    Ok((1..n).filter(|&r| of(r) != root).collect())
}

impl Dp {
    fn differing_ranks(&mut self, digest: &[u8; 32], what: &str) -> Result<Vec<usize>, TrainError> {
        differing_ranks(self.group.as_mut(), digest).map_err(dist(what))
    }

    /// Start of a run: every rank must have the same config and data (see the module docs).
    pub fn check_fingerprint(&mut self, fingerprint: &[u8; 32]) -> Result<(), TrainError> {
        // The data-parallel settings that shape the collectives join the config's fingerprint.
        let mut h = Sha256::new();
        h.update(fingerprint);
        h.update([self.zero.number(), u8::from(self.overlap)]);
        h.update((self.bucket_bytes as u64).to_le_bytes());
        let fingerprint: [u8; 32] = h.finalize().into();
        let bad = self.differing_ranks(&fingerprint, "exchanging the config/data fingerprint")?;
        if !bad.is_empty() {
            return Err(TrainError::Dist(format!(
                "rank(s) {bad:?} started with a different config or data than rank 0 (fingerprint of \
                 the resolved config, the token streams and the data-parallel flags differs); start every \
                 rank with the same --config, --set, --zero, --bucket-mb and --no-overlap flags and data files"
            )));
        }
        Ok(())
    }

    /// Broadcast rank 0's parameters, then verify every rank holds the same bits (SHA-256).
    pub fn sync_params(&mut self, params: &mut [f32]) -> Result<(), TrainError> {
        self.group
            .broadcast(params, 0)
            .map_err(dist("broadcasting the initial weights"))?;
        let digest: [u8; 32] = Sha256::digest(bytemuck_bytes(params)).into();
        let bad = self.differing_ranks(&digest, "checking the initial weights")?;
        if !bad.is_empty() {
            return Err(TrainError::Dist(format!(
                "rank(s) {bad:?} hold different initial weights than rank 0 after the broadcast"
            )));
        }
        if let Some(base) = &mut self.async_base {
            *base = params.to_vec();
        }
        Ok(())
    }

    /// Every rank's per-micro-batch losses, in global micro-batch order (rank 0's first),
    /// whether any rank was asked to stop (Ctrl-C): the ranks agree on the step they stop at,
    /// so they checkpoint together, and every rank's `busy_secs` of the step, in rank order
    /// (`crate::straggler`: the same message carries them). (Asynchronous workers do not wait
    /// for each other: their own losses stand for all, the stop request is local, and no busy
    /// times come back.)
    pub fn gather_losses(
        &mut self,
        mine: &[f32],
        stop: bool,
        busy_secs: f32,
    ) -> Result<Gathered, TrainError> {
        let n = self.size();
        if self.async_base.is_some() {
            return Ok(Gathered {
                losses: mine.repeat(n),
                any_stop: stop,
                busy_secs: None,
            });
        }
        let k = mine.len() + 2;
        let mut all = vec![0.0f32; k * n];
        let r = shard_range(all.len(), n, self.rank());
        all[r.start..r.end - 2].copy_from_slice(mine);
        all[r.end - 2] = if stop { 1.0 } else { 0.0 };
        all[r.end - 1] = busy_secs;
        self.group
            .all_gather(&mut all)
            .map_err(dist("gathering the losses"))?;
        let any_stop = all.chunks(k).any(|c| c[k - 2] != 0.0);
        let busy = all.chunks(k).map(|c| c[k - 1]).collect();
        let losses = all
            .chunks(k)
            .flat_map(|c| c[..k - 2].iter().copied())
            .collect();
        Ok(Gathered {
            losses,
            any_stop,
            busy_secs: Some(busy),
        })
    }

    /// All-gathers a byte string of any length from every rank; returns them in rank order
    /// (e.g. what each rank wrote into a checkpoint).
    pub fn all_gather_bytes(
        &mut self,
        mine: &[u8],
        what: &str,
    ) -> Result<Vec<Vec<u8>>, TrainError> {
        all_gather_bytes(self.group.as_mut(), mine, what)
    }

    /// Start of a run: every rank must start at the same step (resumed from the same
    /// checkpoint, or all fresh). `mine` is this rank's start step, or why it could not load
    /// one; a rank that failed makes every rank fail, naming it.
    pub fn agree_on_start(&mut self, mine: Result<u64, String>) -> Result<(), TrainError> {
        agree_on_start(self.group.as_mut(), mine, TrainError::Dist)
    }
}

/// SHA-256 over the resolved config (kernel threads excluded: they may differ per rank) and the
/// token streams.
pub fn fingerprint(cfg: &crate::TrainConfig, train: &[u32], val: &[u32]) -> [u8; 32] {
    let mut c = cfg.clone();
    c.train.threads = 0;
    let mut h = Sha256::new();
    h.update(c.to_toml().as_bytes());
    for stream in [train, val] {
        h.update((stream.len() as u64).to_le_bytes());
        for chunk in stream.chunks(4096) {
            let bytes: Vec<u8> = chunk.iter().flat_map(|x| x.to_le_bytes()).collect();
            h.update(&bytes);
        }
    }
    h.finalize().into()
}

/// All-gathers a byte string of any length from every rank; returns them in rank order
/// (e.g. what each rank wrote into a checkpoint).
pub fn all_gather_bytes(
    group: &mut dyn Communicator,
    mine: &[u8],
    what: &str,
) -> Result<Vec<Vec<u8>>, TrainError> {
    let (n, me) = (group.size(), group.rank());
    let len = u32::try_from(mine.len())
        .map_err(|_| TrainError::Dist(format!("{what}: {} bytes is too many", mine.len())))?;
    let mut lens = vec![0.0f32; n];
    lens[me] = f32::from_bits(len);
    group.all_gather(&mut lens).map_err(dist(what))?;
    let lens: Vec<usize> = lens.iter().map(|x| x.to_bits() as usize).collect();
    const MAX_BYTES: usize = 64 << 20;
    if let Some(r) = lens.iter().position(|&l| l > MAX_BYTES) {
        return Err(TrainError::Dist(format!(
            "{what}: rank {r} announced {} bytes (more than {MAX_BYTES})",
            lens[r]
        )));
    }
    let words = lens.iter().max().map_or(0, |m| m.div_ceil(4)).max(1);
    let mut all = vec![0.0f32; words * n];
    let mut own = bytes_to_words(mine);
    own.resize(words, 0.0);
    all[shard_range(words * n, n, me)].copy_from_slice(&own);
    group.all_gather(&mut all).map_err(dist(what))?;
    Ok(lens
        .iter()
        .enumerate()
        .map(|(r, &l)| {
            let bytes = bytemuck_bytes(&all[shard_range(words * n, n, r)]);
            bytes[..l.min(bytes.len())].to_vec()
        })
        .collect())
}

/// Start of a run: every rank of `group` must start at the same step (from the same checkpoint,
/// or all fresh). `mine` is this rank's start step, or why it could not load one; a rank that
/// failed makes every rank fail, naming it. Disagreements are reported through `fail` (the
/// caller's error kind: data parallel, pipeline).
pub fn agree_on_start(
    group: &mut dyn Communicator,
    mine: Result<u64, String>,
    fail: fn(String) -> TrainError,
) -> Result<(), TrainError> {
    let text = match &mine {
        Ok(step) => format!("ok {step}"),
        Err(e) => format!("error {e}"),
    };
    let all = all_gather_bytes(group, text.as_bytes(), "agreeing on the start step")?;
    let all: Vec<String> = all
        .iter()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .collect();
    if mine.is_err() {
        return Ok(()); // the caller returns its own error
    }
    if let Some((r, e)) = all
        .iter()
        .enumerate()
        .find_map(|(r, t)| t.strip_prefix("error ").map(|e| (r, e)))
    {
        return Err(fail(format!("rank {r} could not start: {e}")));
    }
    let differ: Vec<usize> = (1..all.len()).filter(|&r| all[r] != all[0]).collect();
    if !differ.is_empty() {
        return Err(fail(format!(
            "rank(s) {differ:?} start at another step than rank 0 ({}); every rank must resume \
             from the same checkpoint (or none)",
            all.iter()
                .enumerate()
                .map(|(r, t)| format!("rank {r}: step {}", t.trim_start_matches("ok ")))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    Ok(())
}
