//! `--nproc-per-node N` or `MIN:MAX`, and the training command as an elastic job runs it at
//! one size (`--dp`, `train.grad_accum`).

use anyhow::{Context, Result};

/// `--nproc-per-node`: a count, or torchrun's `MIN:MAX` for an elastic job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NprocPerNode {
    /// Fewest ranks the job may run with.
    pub min: usize,
    /// Ranks it starts with (and grows back to).
    pub max: usize,
}

impl NprocPerNode {
    /// A fixed count.
    pub fn fixed(n: usize) -> NprocPerNode {
        NprocPerNode { min: n, max: n }
    }

    /// Whether the count may change (MIN < MAX).
    pub fn is_elastic(&self) -> bool {
        self.min < self.max
    }
}

impl std::str::FromStr for NprocPerNode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let num = |x: &str| {
            x.trim().parse::<usize>().map_err(|_| {
                format!("{s:?}: expected a count (3) or MIN:MAX (2:3, torchrun's form)")
            })
        };
        let (min, max) = match s.split_once(':') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => {
                let n = num(s)?;
                (n, n)
            }
        };
        if min == 0 || min > max {
            return Err(format!(
                "{s:?}: MIN:MAX needs 1 ≤ MIN ≤ MAX (e.g. 2:3: start with 3 ranks, go on with 2)"
            ));
        }
        Ok(NprocPerNode { min, max })
    }
}

impl std::fmt::Display for NprocPerNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_elastic() {
            write!(f, "{}:{}", self.min, self.max)
        } else {
            write!(f, "{}", self.max)
        }
    }
}

/// The value of the last `--set train.grad_accum=K` in `command` (`--set K=V` or `--set=K=V`).
pub(crate) fn set_value(command: &[String], key: &str) -> Option<String> {
    let mut found = None;
    let mut it = command.iter();
    while let Some(w) = it.next() {
        let kv = if w == "--set" {
            it.next().map(String::as_str)
        } else {
            w.strip_prefix("--set=")
        };
        if let Some((k, v)) = kv.and_then(|kv| kv.split_once('=')) {
            if k.trim() == key {
                found = Some(v.trim().to_string());
            }
        }
    }
    found
}

/// The value of flag `--name V` / `--name=V` in `command`, if given.
pub(crate) fn flag_value(command: &[String], name: &str) -> Option<String> {
    let mut it = command.iter();
    let mut found = None;
    while let Some(w) = it.next() {
        if w == name {
            found = it.next().cloned();
        } else if let Some(v) = w.strip_prefix(&format!("{name}=")) {
            found = Some(v.to_string());
        }
    }
    found
}

/// The command's `grad_accum`: `--set train.grad_accum=K`, else its `--config` file's, else 1.
pub(crate) fn grad_accum_of(command: &[String]) -> Result<u64> {
    if let Some(v) = set_value(command, "train.grad_accum") {
        return v
            .parse()
            .ok()
            .filter(|k| *k > 0)
            .with_context(|| format!("--set train.grad_accum={v}: expected a count ≥ 1"));
    }
    if let Some(p) = flag_value(command, "--config") {
        let text = std::fs::read_to_string(&p).with_context(|| format!("reading --config {p}"))?;
        let t: toml::Table = text
            .parse()
            .with_context(|| format!("parsing --config {p}"))?;
        if let Some(k) = t.get("train").and_then(|s| s.get("grad_accum")) {
            return k
                .as_integer()
                .and_then(|k| u64::try_from(k).ok())
                .filter(|k| *k > 0)
                .with_context(|| format!("{p}: train.grad_accum = {k}: expected a count ≥ 1"));
        }
    }
    Ok(1)
}

pub(crate) fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// `command` for `ranks` ranks: `--dp ranks`, and `train.grad_accum = g / ranks` (when the
/// launcher keeps the global batch itself: `g` is `Some`).
pub fn command_at(command: &[String], ranks: usize, g: Option<u64>) -> Vec<String> {
    let mut out = Vec::with_capacity(command.len() + 2);
    let mut it = command.iter().peekable();
    while let Some(w) = it.next() {
        if w == "--dp" {
            it.next();
            out.extend(["--dp".to_string(), ranks.to_string()]);
        } else if w.starts_with("--dp=") {
            out.push(format!("--dp={ranks}"));
        } else if g.is_some()
            && w == "--set"
            && it
                .peek()
                .is_some_and(|kv| kv.split('=').next().map(str::trim) == Some("train.grad_accum"))
        {
            it.next();
        } else if g.is_some()
            && w.strip_prefix("--set=")
                .is_some_and(|kv| kv.split('=').next().map(str::trim) == Some("train.grad_accum"))
        {
        } else {
            out.push(w.clone());
        }
    }
    if let Some(g) = g {
        out.extend([
            "--set".to_string(),
            format!("train.grad_accum={}", g / ranks as u64),
        ]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn nproc_per_node_takes_a_count_or_min_max() {
        assert_eq!("3".parse(), Ok(NprocPerNode::fixed(3)));
        assert_eq!("2:3".parse(), Ok(NprocPerNode { min: 2, max: 3 }));
        for bad in ["0", "3:2", "0:2", "x", "2:", ":3", "1:2:3"] {
            let e = bad.parse::<NprocPerNode>().unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
        assert_eq!(NprocPerNode { min: 2, max: 3 }.to_string(), "2:3");
        assert_eq!(NprocPerNode::fixed(4).to_string(), "4");
    }

    #[test]
    fn the_command_at_a_size_keeps_the_global_batch() {
        let c = words("st train --dp 3 --set train.grad_accum=2 --out r --set=train.grad_accum=2");
        assert_eq!(
            command_at(&c, 2, Some(6)),
            words("st train --dp 2 --out r --set train.grad_accum=3")
        );
        let c = words("st train --dp=3 --global-batch 24");
        assert_eq!(
            command_at(&c, 2, None),
            words("st train --dp=2 --global-batch 24")
        );
        assert_eq!(
            grad_accum_of(&words("st train --set train.grad_accum=4")).unwrap(),
            4
        );
        assert_eq!(grad_accum_of(&words("st train")).unwrap(), 1);
        assert!(grad_accum_of(&words("st train --set train.grad_accum=0")).is_err());
    }
}
