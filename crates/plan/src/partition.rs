//! Pipeline partitions: how many transformer layers each pipeline stage runs.
//!
//! A partition lists the layers of each (virtual) stage, contiguous and in order: stage 0 runs
//! layers `0..n0` after the embedding, the last stage runs the last layers before the final norm,
//! LM head and loss. With interleaving there are `pp·vpp` virtual stages and device `d` runs virtual
//! stages `d, d + pp, d + 2pp, …` (Narayanan et al. 2021 §2.2.2).
//!
//! Three ways to get one:
//! - **even** — `layers / stages` each (only when the division is exact);
//! - **explicit** — `--pp-layers 3,5`, checked by [`check`] (parsed by [`parse`]);
//! - **balanced** — [`balanced`] chooses the partition that minimises the slowest stage, counting
//!   the embedding on stage 0 and the LM head + loss on the last stage as stage work (Megatron-LM's
//!   runs drop layers from the first/last stage for the same reason; Llama 3 405B's pipeline had
//!   one layer fewer on its first and last stages, Dubey et al. 2024 §3.3.2).
//!
//! **Tie-breaking** (so every caller gets the same answer): among the partitions whose slowest
//! stage is minimal, the most even one is chosen (least sum of squared stage costs); remaining ties
//! give fewer layers to earlier stages (lexicographically smallest list), because under 1F1B
//! earlier stages keep more micro-batches in flight. Costs that differ by a relative 1e-9 count as
//! equal, so rounding cannot flip a tie.
//!
//! **More stages than layers**: every stage gets at least one layer when `stages ≤ layers`;
//! otherwise some stages must be empty and the same rules choose which (an empty stage still
//! passes activations on; the stages holding the embedding or the head are emptied first when that
//! lowers the slowest stage). [`check`] refuses explicit lists with an empty stage unless there are
//! more stages than layers.
//!
//! The planner needs a partition for millions of candidates per second: [`balanced_uniform`] is
//! the same answer for identical layers in O(1) (tests compare it with [`balanced`]).

use serde::Serialize;

use crate::error::{PlanError, Result};

/// Most (virtual) pipeline stages a layout may have.
pub const MAX_STAGES: usize = 128;

/// How a layout's partition was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Partition {
    /// `layers / (pp·vpp)` layers per stage.
    Even,
    /// Chosen to minimise the slowest stage ([`balanced`]); without a cost model (a bare
    /// [`crate::LayoutRequest::resolve`]) all layers count the same and the extras nothing.
    Balanced,
    /// Given by the user (`--pp-layers`).
    Explicit,
}

impl Partition {
    /// Lower-case name, as the JSON writes it.
    pub fn name(self) -> &'static str {
        match self {
            Partition::Even => "even",
            Partition::Balanced => "balanced",
            Partition::Explicit => "explicit",
        }
    }
}

/// Layers per (virtual) pipeline stage, stored inline so a `Layout` stays `Copy`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct StageLayers {
    len: u16,
    counts: [u16; MAX_STAGES],
}

impl std::fmt::Debug for StageLayers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.as_slice()).finish()
    }
}

impl std::fmt::Display for StageLayers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, n) in self.as_slice().iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{n}")?;
        }
        Ok(())
    }
}

impl Serialize for StageLayers {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_seq(self.as_slice())
    }
}

impl Default for StageLayers {
    fn default() -> Self {
        StageLayers {
            len: 0,
            counts: [0; MAX_STAGES],
        }
    }
}

impl StageLayers {
    /// From a list of counts (at most [`MAX_STAGES`] entries, each below 65536).
    pub fn from_counts(counts: &[usize]) -> Result<StageLayers> {
        if counts.len() > MAX_STAGES {
            return Err(PlanError::Layout(format!(
                "{} pipeline stages (pp x vpp); at most {MAX_STAGES} are supported",
                counts.len()
            )));
        }
        let mut out = StageLayers {
            len: counts.len() as u16,
            ..Default::default()
        };
        for (slot, &n) in out.counts.iter_mut().zip(counts) {
            *slot = u16::try_from(n).map_err(|_| {
                PlanError::Layout(format!("{n} layers on one pipeline stage is too many"))
            })?;
        }
        Ok(out)
    }

    /// `layers` spread over `stages` as evenly as possible, the remainder on the last stages
    /// (the even partition when `stages` divides `layers`). `stages` must be 1..=MAX_STAGES.
    pub fn spread(layers: u64, stages: u64) -> StageLayers {
        debug_assert!((1..=MAX_STAGES as u64).contains(&stages));
        let s = stages.clamp(1, MAX_STAGES as u64);
        let (q, r) = (layers / s, layers % s);
        let mut out = StageLayers {
            len: s as u16,
            ..Default::default()
        };
        for (i, slot) in out.counts[..s as usize].iter_mut().enumerate() {
            *slot = (q + u64::from(i as u64 >= s - r)) as u16;
        }
        out
    }

    /// The counts, one per (virtual) stage.
    pub fn as_slice(&self) -> &[u16] {
        &self.counts[..self.len as usize]
    }

    /// Number of (virtual) stages.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// True when no stage is listed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Total layers.
    pub fn total(&self) -> u64 {
        self.as_slice().iter().map(|&n| n as u64).sum()
    }

    /// True when every stage has the same count.
    pub fn is_even(&self) -> bool {
        self.as_slice().windows(2).all(|w| w[0] == w[1])
    }

    /// Layers on device `d` of `pp` (the sum of its virtual stages `d, d + pp, …`).
    #[inline]
    pub fn device_layers(&self, d: usize, pp: usize) -> u64 {
        self.as_slice()
            .iter()
            .skip(d)
            .step_by(pp.max(1))
            .map(|&n| n as u64)
            .sum()
    }
}

/// Parses an explicit partition, `"3,5"` (spaces allowed).
pub fn parse(text: &str) -> Result<Vec<usize>> {
    let bad = |reason: String| PlanError::Invalid {
        field: "--pp-layers",
        reason,
    };
    if text.trim().is_empty() {
        return Err(bad(
            "empty list; give the layers of each pipeline stage, e.g. --pp-layers 3,5".into(),
        ));
    }
    text.split(',')
        .map(|part| {
            let p = part.trim();
            p.parse::<usize>().map_err(|_| {
                bad(format!(
                    "'{p}' is not a whole number of layers in '{text}'; write e.g. --pp-layers 3,5"
                ))
            })
        })
        .collect()
}

/// Checks an explicit partition against the model's layer count; errors show the arithmetic.
/// The stage count (pp·vpp) is checked by `Layout::validate`.
pub fn check(layers: usize, counts: &[usize]) -> Result<()> {
    let err = |s: String| Err(PlanError::Layout(s));
    if counts.is_empty() {
        return err("--pp-layers lists no stage".into());
    }
    if counts.len() > MAX_STAGES {
        return err(format!(
            "--pp-layers lists {} stages; at most {MAX_STAGES} are supported",
            counts.len()
        ));
    }
    let sum: usize = counts.iter().sum();
    let shown = counts
        .iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(" + ");
    if sum != layers {
        return err(format!(
            "--pp-layers {shown} = {sum}, but the model has {layers} layers"
        ));
    }
    if counts.len() <= layers {
        if let Some(i) = counts.iter().position(|&n| n == 0) {
            return err(format!(
                "--pp-layers gives stage {i} no layers; with {} stages and {layers} layers every stage needs at least one",
                counts.len()
            ));
        }
    }
    Ok(())
}

/// Two costs within a relative 1e-9 are a tie.
#[inline]
fn less(a: f64, b: f64) -> bool {
    a < b - 1e-9 * a.abs().max(b.abs())
}

/// The exact balanced partition of `layer_costs` (one per layer, in order) over `stages`
/// contiguous stages, stage 0 also paying `first_extra` and the last `last_extra` (both when
/// there is one stage). Tie-breaking and empty stages: see the module documentation.
/// Dynamic programming, O(stages · layers²); for identical layers use [`balanced_uniform`].
pub fn balanced(
    stages: usize,
    layer_costs: &[f64],
    first_extra: f64,
    last_extra: f64,
) -> Vec<usize> {
    let l = layer_costs.len();
    if stages == 0 {
        return Vec::new();
    }
    let lo = usize::from(stages <= l);
    let mut prefix = vec![0.0; l + 1];
    for (i, c) in layer_costs.iter().enumerate() {
        prefix[i + 1] = prefix[i] + c;
    }
    // Cost of stage `i` running layers j..k.
    let cost = |i: usize, j: usize, k: usize| {
        let mut c = prefix[k] - prefix[j];
        if i == 0 {
            c += first_extra;
        }
        if i + 1 == stages {
            c += last_extra;
        }
        c
    };
    // Pass 1: the smallest possible slowest stage. best[i][j] = min over splits of layers j..l
    // across stages i.. of the slowest stage.
    let inf = f64::INFINITY;
    let mut best = vec![vec![inf; l + 1]; stages + 1];
    best[stages][l] = 0.0;
    for i in (0..stages).rev() {
        let rest = stages - i - 1;
        for j in 0..=l {
            // Stage i takes n layers, leaving at least lo·rest for the rest.
            let mut b = inf;
            let max_n = (l - j).saturating_sub(lo * rest);
            for n in lo..=max_n {
                let tail = best[i + 1][j + n];
                if tail == inf {
                    continue;
                }
                b = b.min(cost(i, j, j + n).max(tail));
            }
            best[i][j] = b;
        }
    }
    let bound = best[0][0];
    let ok = |c: f64| !less(bound, c);
    // Pass 2: among splits whose every stage is within the bound, the least sum of squares.
    let mut sq = vec![vec![inf; l + 1]; stages + 1];
    sq[stages][l] = 0.0;
    for i in (0..stages).rev() {
        let rest = stages - i - 1;
        for j in 0..=l {
            let mut b = inf;
            let max_n = (l - j).saturating_sub(lo * rest);
            for n in lo..=max_n {
                let tail = sq[i + 1][j + n];
                let c = cost(i, j, j + n);
                if tail == inf || !ok(c) {
                    continue;
                }
                b = b.min(c * c + tail);
            }
            sq[i][j] = b;
        }
    }
    // Reconstruct front to back, taking the fewest layers that reach the optimum.
    let mut out = Vec::with_capacity(stages);
    let mut j = 0;
    for i in 0..stages {
        let rest = stages - i - 1;
        let max_n = (l - j).saturating_sub(lo * rest);
        let target = sq[i][j];
        let n = (lo..=max_n)
            .find(|&n| {
                let c = cost(i, j, j + n);
                let tail = sq[i + 1][j + n];
                tail != inf && ok(c) && !less(target, c * c + tail)
            })
            .unwrap_or(max_n);
        out.push(n);
        j += n;
    }
    out
}

/// Objective of one candidate in [`balanced_uniform`]: slowest stage, sum of squares.
#[inline]
fn uniform_score(stages: u64, n0: u64, nl: u64, mid: u64, c: f64, e0: f64, e1: f64) -> (f64, f64) {
    let k = stages - 2;
    let (q, r) = (mid / k, mid % k);
    let (a, b) = (c * n0 as f64 + e0, c * nl as f64 + e1);
    let top = if r > 0 { q + 1 } else { q } as f64 * c;
    let sq = a * a
        + b * b
        + (k - r) as f64 * (c * q as f64).powi(2)
        + r as f64 * (c * (q + 1) as f64).powi(2);
    (a.max(b).max(top), sq)
}

/// [`balanced`] for `layers` identical layers of cost `layer_cost`, in O(1): the first and last
/// stages' counts are searched next to the continuous optimum (a common water level), the middle
/// stages share the rest as evenly as possible, remainder on the later ones. Same answer as
/// [`balanced`] (tests compare them). `stages` must be 1..=MAX_STAGES.
pub fn balanced_uniform(
    stages: u64,
    layers: u64,
    layer_cost: f64,
    first_extra: f64,
    last_extra: f64,
) -> StageLayers {
    let s = stages.clamp(1, MAX_STAGES as u64);
    if s == 1 || layer_cost <= 0.0 || !layer_cost.is_finite() {
        return StageLayers::spread(layers, s);
    }
    let lo = u64::from(s <= layers);
    let c = layer_cost;
    let (e0, e1) = (first_extra.max(0.0), last_extra.max(0.0));
    let mut out = StageLayers {
        len: s as u16,
        ..Default::default()
    };
    // Candidate (n0, nl) around the continuous solution; the best by (slowest, sum of squares,
    // fewer layers first).
    let k = s - 2;
    let mut best: Option<((f64, f64), u64, u64)> = None;
    let mut consider = |n0: u64, nl: u64| {
        if n0 < lo || nl < lo || n0 + nl > layers || layers - n0 - nl < lo * k {
            return;
        }
        if k == 0 && n0 + nl != layers {
            return;
        }
        let score = if k == 0 {
            let (a, b) = (c * n0 as f64 + e0, c * nl as f64 + e1);
            (a.max(b), a * a + b * b)
        } else {
            uniform_score(s, n0, nl, layers - n0 - nl, c, e0, e1)
        };
        let better = match best {
            None => true,
            Some((bs, b0, bl)) => {
                if less(score.0, bs.0) {
                    true
                } else if less(bs.0, score.0) {
                    false
                } else if less(score.1, bs.1) {
                    true
                } else if less(bs.1, score.1) {
                    false
                } else {
                    (n0, u64::MAX - nl) < (b0, u64::MAX - bl)
                }
            }
        };
        if better {
            best = Some((score, n0, nl));
        }
    };
    // Water level w (in layers) shared by the stages not held at the minimum:
    // Σ (w − extra_i / c) = layers left. The first/last stage may sit at the minimum when its
    // extra alone exceeds the level, so each of the four clamp cases proposes its own level.
    let (x0, x1) = (e0 / c, e1 / c);
    let level = |c0: bool, c1: bool| -> f64 {
        let free = s - u64::from(c0) - u64::from(c1);
        let rest = layers.saturating_sub(lo * (u64::from(c0) + u64::from(c1))) as f64;
        let extras = if c0 { 0.0 } else { x0 } + if c1 { 0.0 } else { x1 };
        (rest + extras) / free.max(1) as f64
    };
    // A clamp case matters only when the free level leaves that stage near its minimum.
    let w = level(false, false);
    let (may0, may1) = (w - x0 < lo as f64 + 2.0, w - x1 < lo as f64 + 2.0);
    for (c0, c1) in [(false, false), (true, false), (false, true), (true, true)] {
        if (c0 && !may0) || (c1 && !may1) {
            continue;
        }
        let w = level(c0, c1);
        let around = |x: f64, clamped: bool| -> (u64, u64) {
            if clamped {
                return (lo, lo + 1);
            }
            let g = (w - x).max(0.0).floor().min(layers as f64) as u64;
            (g.saturating_sub(1), g + 1)
        };
        let (a0, b0) = around(x0, c0);
        let (a1, b1) = around(x1, c1);
        for n0 in a0..=b0 {
            for nl in a1..=b1 {
                consider(n0, nl);
            }
        }
    }
    let Some((_, n0, nl)) = best else {
        return StageLayers::spread(layers, s);
    };
    out.counts[0] = n0 as u16;
    out.counts[s as usize - 1] = nl as u16;
    if let Some(q) = (layers - n0 - nl).checked_div(k) {
        let r = (layers - n0 - nl) % k;
        for i in 0..k {
            out.counts[1 + i as usize] = (q + u64::from(i >= k - r)) as u16;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_cost(counts: &[usize], costs: &[f64], e0: f64, e1: f64) -> f64 {
        let mut j = 0;
        let mut worst: f64 = 0.0;
        for (i, &n) in counts.iter().enumerate() {
            let mut c: f64 = costs[j..j + n].iter().sum();
            if i == 0 {
                c += e0;
            }
            if i + 1 == counts.len() {
                c += e1;
            }
            worst = worst.max(c);
            j += n;
        }
        worst
    }

    /// Every contiguous split (for small cases), to check optimality by brute force.
    fn all_splits(l: usize, s: usize, lo: usize) -> Vec<Vec<usize>> {
        if s == 1 {
            return if l >= lo { vec![vec![l]] } else { vec![] };
        }
        let mut out = Vec::new();
        for n in lo..=l {
            for mut rest in all_splits(l - n, s - 1, lo) {
                rest.insert(0, n);
                out.push(rest);
            }
        }
        out
    }

    #[test]
    fn hand_derived_cases() {
        // 5 equal layers on 2 stages, no extras: 2 + 3 (the remainder goes to the later stage).
        assert_eq!(balanced(2, &[1.0; 5], 0.0, 0.0), vec![2, 3]);
        // An LM head worth 2.5 layers: stage 1 pays 2.5 + n1; 6 layers: 4 | 2 gives max(4, 4.5)
        // = 4.5, 5 | 1 gives max(5, 3.5) = 5, 3 | 3 gives 5.5; so 4, 2.
        assert_eq!(balanced(2, &[1.0; 6], 0.0, 2.5), vec![4, 2]);
        // 10 layers on 4 stages: the bottleneck is 3; 2,2,3,3 is the most even.
        assert_eq!(balanced(4, &[1.0; 10], 0.0, 0.0), vec![2, 2, 3, 3]);
        // Uneven layer costs: the heavy layer sits alone.
        assert_eq!(balanced(2, &[1.0, 1.0, 1.0, 5.0], 0.0, 0.0), vec![3, 1]);
        // More stages than layers: 2 layers on 3 stages; the head (10) is on the last stage, so
        // that stage is emptied first.
        assert_eq!(balanced(3, &[1.0; 2], 0.0, 10.0), vec![1, 1, 0]);
        assert_eq!(balanced(1, &[1.0; 3], 4.0, 4.0), vec![3]);
        assert!(balanced(0, &[1.0; 3], 0.0, 0.0).is_empty());
    }

    #[test]
    fn dynamic_programme_is_optimal_by_brute_force() {
        let costs = [1.0, 3.0, 2.0, 2.0, 5.0, 1.0, 1.0, 4.0];
        for s in 1..=5 {
            for (e0, e1) in [(0.0, 0.0), (2.0, 0.0), (0.5, 6.0), (9.0, 9.0)] {
                let got = balanced(s, &costs, e0, e1);
                assert_eq!(got.len(), s);
                assert_eq!(got.iter().sum::<usize>(), costs.len());
                let best = all_splits(costs.len(), s, 1)
                    .iter()
                    .map(|c| max_cost(c, &costs, e0, e1))
                    .fold(f64::INFINITY, f64::min);
                let mine = max_cost(&got, &costs, e0, e1);
                assert!(
                    (mine - best).abs() < 1e-12,
                    "s {s}: {got:?} {mine} vs {best}"
                );
            }
        }
    }

    #[test]
    fn uniform_closed_form_equals_the_dynamic_programme() {
        for s in 1..=9u64 {
            for layers in 1..=30u64 {
                for (e0, e1) in [
                    (0.0, 0.0),
                    (0.1, 0.37),
                    (0.0, 2.4),
                    (1.3, 0.2),
                    (3.0, 3.0),
                    (0.9, 7.7),
                    (12.5, 0.0),
                    (0.05, 30.0),
                    (4.49, 2.51),
                    (1.0, 1.0),
                    (2.0, 0.0),
                    (0.004, 0.21),
                    (0.004, 1.87),
                    (0.5, 0.5),
                    (6.0, 0.7),
                    (0.33, 19.0),
                ] {
                    let c = 1.7;
                    let fast = balanced_uniform(s, layers, c, e0 * c, e1 * c);
                    let slow = balanced(s as usize, &vec![c; layers as usize], e0 * c, e1 * c);
                    let fast: Vec<usize> = fast.as_slice().iter().map(|&n| n as usize).collect();
                    assert_eq!(fast, slow, "stages {s}, layers {layers}, extras {e0}/{e1}");
                }
            }
        }
    }

    #[test]
    fn uniform_closed_form_equals_the_dynamic_programme_on_random_cases() {
        // A fixed linear congruential sequence: reproducible, no dependency.
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 11) as f64 / (1u64 << 53) as f64
        };
        for _ in 0..1500 {
            let s = 1 + (next() * 16.0) as u64;
            let layers = 1 + (next() * 60.0) as u64;
            let c = 0.1 + next() * 3.0;
            let (e0, e1) = (next() * next() * 8.0 * c, next() * 8.0 * c);
            let fast = balanced_uniform(s, layers, c, e0, e1);
            let slow = balanced(s as usize, &vec![c; layers as usize], e0, e1);
            let fast: Vec<usize> = fast.as_slice().iter().map(|&n| n as usize).collect();
            assert_eq!(
                fast, slow,
                "stages {s}, layers {layers}, cost {c}, extras {e0}/{e1}"
            );
        }
    }

    #[test]
    fn explicit_lists_are_checked_with_the_arithmetic() {
        assert_eq!(parse("3, 5").unwrap(), vec![3, 5]);
        let e = parse("3,x").unwrap_err().to_string();
        assert!(e.contains("'x' is not a whole number"), "{e}");
        assert!(parse("").is_err());
        assert!(parse("3,-1").is_err());
        assert!(check(8, &[3, 5]).is_ok());
        let e = check(9, &[3, 5]).unwrap_err().to_string();
        assert!(e.contains("3 + 5 = 8, but the model has 9 layers"), "{e}");
        let e = check(8, &[0, 8]).unwrap_err().to_string();
        assert!(e.contains("stage 0 no layers"), "{e}");
        assert!(check(2, &[1, 1, 0]).is_ok());
    }

    #[test]
    fn stage_layers_store_and_sum_per_device() {
        let s = StageLayers::from_counts(&[3, 5, 4, 4]).unwrap();
        assert_eq!(s.total(), 16);
        assert_eq!(s.device_layers(0, 2), 7);
        assert_eq!(s.device_layers(1, 2), 9);
        assert_eq!(s.to_string(), "3,5,4,4");
        assert_eq!(StageLayers::spread(10, 4).as_slice(), &[2, 2, 3, 3]);
        assert!(StageLayers::spread(8, 4).is_even());
        assert!(StageLayers::from_counts(&[1; MAX_STAGES + 1]).is_err());
        assert_eq!(serde_json::to_string(&s).unwrap(), "[3,5,4,4]");
    }
}
