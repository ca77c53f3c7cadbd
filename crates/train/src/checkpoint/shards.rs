//! A checkpoint's optimizer files: which file holds which offset ranges of AdamW's `m` and
//! `v`, the check that they cover every element exactly once, and cutting any list of ranges
//! out of them. Data-parallel layouts (`Dp::owned_ranges`) may give a rank several disjoint
//! ranges; nothing here assumes one contiguous shard per rank.

use super::FileEntry;
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// Where a checkpoint's AdamW `m` and `v` are.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OptimizerFiles {
    /// Data-parallel ranks of the run that wrote it (1 for one process).
    pub dp_size: usize,
    /// ZeRO stage of that run: 0 = rank 0 wrote the whole state as one file; 1 or 2 = every
    /// rank wrote the ranges it held.
    pub zero_stage: u8,
    /// Elements of `m` (and of `v`): the flat parameter count.
    pub len: usize,
    /// The files, in rank order; together their ranges cover `0..len` exactly once.
    pub shards: Vec<OptimizerShard>,
}

/// One optimizer-state file: safetensors `adamw.m` and `adamw.v`, each the values of `ranges`
/// concatenated in order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OptimizerShard {
    /// The data-parallel rank that wrote it.
    pub rank: usize,
    /// The file.
    pub file: FileEntry,
    /// Offset ranges of the flat buffer it holds, in file order.
    pub ranges: Vec<Range<usize>>,
}

/// The optimizer file of `rank` of `dp_size` at `step`: one per rank under ZeRO (`sharded`),
/// else the one whole-state file.
pub(super) fn optimizer_file_name(step: u64, rank: usize, dp_size: usize, sharded: bool) -> String {
    if sharded {
        format!("step-{step:08}.optim-rank-{rank}-of-{dp_size}.safetensors")
    } else {
        format!("step-{step:08}.state.safetensors")
    }
}

/// Checks that the optimizer files fit the run that wrote them and that their ranges cover
/// `0..len` exactly once; the error names the missing rank, the gap or the overlap.
pub(super) fn check_optimizer_files(o: &OptimizerFiles) -> Result<(), String> {
    if o.shards.is_empty() {
        return Err("the manifest lists no optimizer file".into());
    }
    if o.zero_stage > 0 {
        for r in 0..o.dp_size {
            if !o.shards.iter().any(|s| s.rank == r) {
                return Err(format!(
                    "the manifest lists no optimizer file of rank {r} of {} (ZeRO-{}: expected {})",
                    o.dp_size,
                    o.zero_stage,
                    optimizer_file_name(0, r, o.dp_size, true).replacen(
                        "step-00000000",
                        "step-N",
                        1
                    )
                ));
            }
        }
    }
    let mut pieces: Vec<(&Range<usize>, &str)> = Vec::new();
    for s in &o.shards {
        for r in &s.ranges {
            if r.start > r.end {
                return Err(format!("{} lists the reversed range {r:?}", s.file.name));
            }
            if r.start < r.end {
                pieces.push((r, &s.file.name));
            }
        }
    }
    pieces.sort_by_key(|(r, _)| r.start);
    let (mut next, mut prev) = (0usize, "");
    for (r, name) in pieces {
        if r.start < next {
            return Err(format!(
                "optimizer elements {}..{} are in both {prev} and {name}",
                r.start,
                next.min(r.end)
            ));
        }
        if r.start > next {
            return Err(format!(
                "no optimizer file holds elements {next}..{} (of {}): a shard is missing from the manifest",
                r.start, o.len
            ));
        }
        (next, prev) = (r.end, name);
    }
    if next != o.len {
        return Err(if next < o.len {
            format!(
                "no optimizer file holds elements {next}..{} (of {}): a shard is missing from the manifest",
                o.len, o.len
            )
        } else {
            format!(
                "{prev} holds elements up to {next}, beyond the {} parameters",
                o.len
            )
        });
    }
    Ok(())
}

/// Copies the values of `src` (little-endian f32 bytes of the ranges `have` concatenated, as a
/// safetensors file holds them) that fall inside `want` into `dst` (the ranges `want`
/// concatenated). Reads only the overlapping bytes: a rank resuming under ZeRO never decodes
/// the rest of a shard file.
pub(super) fn copy_overlap(
    dst: &mut [f32],
    want: &[Range<usize>],
    src: &[u8],
    have: &[Range<usize>],
) {
    let mut src_at = 0;
    for h in have {
        let mut dst_at = 0;
        for w in want {
            let (lo, hi) = (h.start.max(w.start), h.end.min(w.end));
            if lo < hi {
                let bytes = &src[4 * (src_at + lo - h.start)..4 * (src_at + hi - h.start)];
                let out = &mut dst[dst_at + lo - w.start..dst_at + hi - w.start];
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            dst_at += w.len();
        }
        src_at += h.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::FileEntry;

    fn shard(rank: usize, ranges: &[Range<usize>]) -> OptimizerShard {
        OptimizerShard {
            rank,
            file: FileEntry {
                name: optimizer_file_name(3, rank, 2, true),
                bytes: 0,
                sha256: String::new(),
            },
            ranges: ranges.to_vec(),
        }
    }

    #[test]
    fn optimizer_files_must_cover_every_element_once() {
        let files = |shards| OptimizerFiles {
            dp_size: 2,
            zero_stage: 1,
            len: 10,
            shards,
        };
        // Several pieces per rank, interleaved (bucketed shards).
        let ok = files(vec![
            shard(0, &[0..3, 6..8]),
            shard(1, &[3..6, 8..10, 10..10]),
        ]);
        check_optimizer_files(&ok).unwrap();
        let e = check_optimizer_files(&files(vec![shard(0, &[0..5])])).unwrap_err();
        assert!(
            e.contains("rank 1 of 2") && e.contains("optim-rank-1-of-2"),
            "{e}"
        );
        let e =
            check_optimizer_files(&files(vec![shard(0, &[0..5]), shard(1, &[6..10])])).unwrap_err();
        assert!(e.contains("elements 5..6"), "{e}");
        let e =
            check_optimizer_files(&files(vec![shard(0, &[0..6]), shard(1, &[5..10])])).unwrap_err();
        assert!(e.contains("5..6 are in both"), "{e}");
        let e =
            check_optimizer_files(&files(vec![shard(0, &[0..5]), shard(1, &[5..8])])).unwrap_err();
        assert!(e.contains("elements 8..10"), "{e}");
        let e =
            check_optimizer_files(&files(vec![shard(0, &[0..5]), shard(1, &[5..11])])).unwrap_err();
        assert!(e.contains("beyond"), "{e}");
    }

    #[test]
    fn any_ranges_are_cut_out_of_any_shards() {
        // m[i] = i, written as two shards of two pieces each, read back as three other pieces.
        let have = [vec![0..3, 6..8], vec![3..6, 8..10]];
        let want = [9..10, 2..7, 0..1];
        let mut out = vec![-1.0f32; 7];
        for h in &have {
            let src: Vec<u8> = h
                .iter()
                .flat_map(|r| r.clone())
                .flat_map(|i| (i as f32).to_le_bytes())
                .collect();
            copy_overlap(&mut out, &want, &src, h);
        }
        assert_eq!(out, [9.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.0]);
    }
}
