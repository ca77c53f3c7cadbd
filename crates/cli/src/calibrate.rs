//! `scaletrain calibrate FILE…`: measured step times (CSV) → a calibration file.
//!
//! Each CSV has a header of estimate flag names (without dashes, `-` or `_`) plus `step_secs`,
//! one measured run per line, e.g.
//!
//! ```text
//! model,gpu,gpus,tp,pp,micro-batch,global-batch,precision,step_secs
//! llama3-8b,h100-sxm,8,1,1,1,128,fp8-current,9.1
//! ```
//!
//! Every row must give the layout it ran with. Lines starting with `#` are comments.
//!
//! With `--cpu` (or when every FILE is a folder) the FILEs are run folders of `scaletrain
//! train` instead, and the fit is the CPU runtime's (`calibrate_cpu`).

use std::path::PathBuf;

use anyhow::{bail, Context as _, Result};
use clap::Args;
use plan::calibrate::{fit, Measured};

use crate::spec::{read_text, SpecArgs};

/// `scaletrain calibrate`.
#[derive(Debug, Args)]
pub struct CalibrateArgs {
    /// CSV files of measured runs (header: flag names and `step_secs`).
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Where to write the calibration file (JSON) that `estimate --calibration` reads.
    #[arg(long, default_value = "calibration.json")]
    pub out: PathBuf,
    /// Bootstrap resamples for the confidence interval.
    #[arg(long, default_value_t = 1000)]
    pub bootstrap: usize,
    /// The FILEs are run folders of `scaletrain train` (`--out`): fit the CPU runtime's
    /// constants for `plan --cpu --calibration` (implied when every FILE is a folder).
    #[arg(long)]
    pub cpu: bool,
}

/// One CSV cell as a TOML value of the type `SpecArgs` wants for `key`: the typed reading
/// (integer, float, boolean) when the field accepts it, else a string.
fn cell_value(key: &str, cell: &str) -> toml::Value {
    let typed = if let Ok(i) = cell.parse::<i64>() {
        Some(toml::Value::Integer(i))
    } else if let Ok(f) = cell.parse::<f64>() {
        Some(toml::Value::Float(f))
    } else if let Ok(b) = cell.parse::<bool>() {
        Some(toml::Value::Boolean(b))
    } else {
        None
    };
    if let Some(v) = typed {
        let mut t = toml::map::Map::new();
        t.insert(key.to_string(), v.clone());
        if toml::Value::Table(t).try_into::<SpecArgs>().is_ok() {
            return v;
        }
    }
    toml::Value::String(cell.to_string())
}

fn rows(path: &std::path::Path) -> Result<Vec<Measured>> {
    let text = read_text(path, "calibrate")?;
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'));
    let Some((_, header)) = lines.next() else {
        bail!(
            "{}: empty file; the first line is the header (flag names and step_secs)",
            path.display()
        );
    };
    let header: Vec<String> = header
        .split(',')
        .map(|h| h.trim().replace('_', "-"))
        .collect();
    let Some(step_col) = header.iter().position(|h| h == "step-secs") else {
        bail!(
            "{}: the header has no step_secs column (measured seconds per optimizer step)",
            path.display()
        );
    };
    let mut out = Vec::new();
    for (i, line) in lines {
        let at = format!("{}:{}", path.display(), i + 1);
        let cells: Vec<&str> = line.split(',').map(str::trim).collect();
        if cells.len() != header.len() {
            bail!(
                "{at}: {} cells, the header has {}",
                cells.len(),
                header.len()
            );
        }
        let step_secs: f64 = cells[step_col].parse().map_err(|_| {
            anyhow::anyhow!("{at}: step_secs '{}' is not a number", cells[step_col])
        })?;
        let mut t = toml::map::Map::new();
        for (k, c) in header.iter().zip(&cells) {
            if k != "step-secs" && !c.is_empty() {
                t.insert(k.clone(), cell_value(k, c));
            }
        }
        let spec: SpecArgs = toml::Value::Table(t).try_into().map_err(|e| {
            anyhow::anyhow!(
                "{at}: {e}; columns are estimate's flag names, e.g. micro-batch, global-batch"
            )
        })?;
        if !spec.has_layout() {
            bail!("{at}: give the layout the run used (dp/tp/pp/micro-batch/zero columns)");
        }
        let (mut ctx, _) = spec
            .context(crate::default_gpus(&spec))
            .with_context(|| at.clone())?;
        ctx.calib = plan::Calibration::default();
        let mut layout = spec
            .layout_request()?
            .resolve(&ctx.model, ctx.cluster.gpus, ctx.recipe.global_batch)
            .with_context(|| at.clone())?;
        ctx.balance(&mut layout);
        out.push(Measured {
            label: at,
            ctx,
            layout,
            step_secs,
        });
    }
    Ok(out)
}

/// Fits, prints the result and writes the file.
pub fn run(a: &CalibrateArgs) -> Result<()> {
    if a.cpu || a.files.iter().all(|f| f.is_dir()) {
        return crate::calibrate_cpu::run(&a.files, &a.out, a.bootstrap);
    }
    let mut runs = Vec::new();
    for f in &a.files {
        runs.extend(rows(f)?);
    }
    if runs.is_empty() {
        bail!("no measured runs in {:?}", a.files);
    }
    let f = fit(&runs, a.bootstrap, 0x5ca1e)?;
    println!(
        "efficiency {} (90% bootstrap CI [{}, {}], {} resamples) from {} runs",
        f.efficiency, f.efficiency_ci90[0], f.efficiency_ci90[1], f.bootstrap, f.runs
    );
    println!(
        "step-time error: mean |error| {:.1}% before (efficiency 1), {:.1}% after; residuals mean {:+.1}%, sd {:.1}%",
        f.mean_abs_error_before * 100.0,
        f.mean_abs_error_after * 100.0,
        f.residual_mean * 100.0,
        f.residual_sd * 100.0
    );
    std::fs::write(&a.out, serde_json::to_string_pretty(&f)? + "\n")
        .with_context(|| format!("cannot write {}", a.out.display()))?;
    println!(
        "wrote {} (use: scaletrain estimate --calibration {})",
        a.out.display(),
        a.out.display()
    );
    Ok(())
}
