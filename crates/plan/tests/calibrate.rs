//! `calibrate` round trip: step times generated from a known efficiency (with ±3% noise) are
//! fitted back to it, inside the bootstrap interval, and the fit improves the error.

use plan::calibrate::{fit, predict, Measured};
use plan::recipe::{Optimizer, Precision};
use plan::{gpu_preset, preset, Calibration, ClusterSpec, Context, Layout, Recipe};

fn run(model: &str, gpus: u64, tp: u64, mb: u64, gb: u64, noise: f64, truth: f64) -> Measured {
    let ctx = Context {
        model: preset(model).unwrap(),
        cluster: ClusterSpec::new(gpu_preset("h100-sxm").unwrap(), gpus, None, None).unwrap(),
        recipe: Recipe::new(1e11, gb, Precision::Bf16Mixed, Optimizer::Adamw),
        calib: Calibration::default(),
    };
    let dp = gpus / tp;
    let layout = Layout {
        dp,
        tp,
        pp: 1,
        cp: 1,
        ep: 1,
        vpp: 1,
        sp: tp > 1,
        zero: 1,
        micro_batch: mb,
        grad_accum: gb / (dp * mb),
        stage_layers: plan::StageLayers::default(),
        partition: plan::Partition::Even,
    };
    layout.validate(&ctx.model, gpus, gb).unwrap();
    let mut m = Measured {
        label: format!("{model} {gpus}"),
        ctx,
        layout,
        step_secs: 1.0,
    };
    m.step_secs = predict(&m, truth) * (1.0 + noise);
    m
}

#[test]
fn synthetic_runs_recover_the_efficiency_within_the_interval() {
    let truth = 0.8;
    let noise = [0.03, -0.02, 0.01, -0.03, 0.02, 0.0, -0.01, 0.025];
    let runs = vec![
        run("llama2-7b", 8, 1, 1, 64, noise[0], truth),
        run("llama2-7b", 16, 2, 2, 64, noise[1], truth),
        run("llama2-13b", 16, 2, 1, 128, noise[2], truth),
        run("llama2-13b", 32, 4, 1, 128, noise[3], truth),
        run("llama3-8b", 8, 1, 1, 64, noise[4], truth),
        run("llama3-8b", 16, 2, 2, 128, noise[5], truth),
        run("gpt2-1.5b", 8, 1, 4, 256, noise[6], truth),
        run("llama2-70b", 64, 8, 1, 64, noise[7], truth),
    ];
    let f = fit(&runs, 200, 7).unwrap();
    let [lo, hi] = f.efficiency_ci90;
    assert!(lo <= truth && truth <= hi, "{truth} outside [{lo}, {hi}]");
    assert!((f.efficiency - truth).abs() <= 0.03, "{}", f.efficiency);
    assert!(hi - lo < 0.1, "interval [{lo}, {hi}] too wide for 3% noise");
    assert!(f.mean_abs_error_after < f.mean_abs_error_before);
    assert!(f.mean_abs_error_after < 0.04, "{}", f.mean_abs_error_after);
    // The residual spread is the noise's: sd of the list above is 2.2%.
    assert!((0.01..0.04).contains(&f.residual_sd), "{}", f.residual_sd);
    // The prediction interval of a fitted run holds its measurement.
    let p = predict(&runs[0], f.efficiency);
    let [a, b] = f.interval(p);
    assert!(a < runs[0].step_secs && runs[0].step_secs < b);
    f.validate().unwrap();
}

#[test]
fn bad_measurements_are_refused() {
    let mut r = run("llama2-7b", 8, 1, 1, 64, 0.0, 1.0);
    r.step_secs = -1.0;
    let e = fit(&[r], 10, 1).unwrap_err().to_string();
    assert!(e.contains("step_secs") && e.contains("positive"), "{e}");
    assert!(fit(&[], 10, 1).is_err());
}
