//! Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using
//! Megatron-LM" (arXiv 2104.04473), Table 1: achieved TFLOP/s per GPU (counted with eq. 3, which
//! includes the recomputed forward), predicted out of sample.

use crate::cost::{Calibration, Context};
use crate::explain::NoTrace;
use crate::hardware::{gpu_preset, ClusterSpec};
use crate::layout::Layout;
use crate::model::preset;
use crate::partition::{Partition, StageLayers};
use crate::recipe::Recompute;

use super::{megatron_recipe, Row};

struct NarRow {
    model: &'static str,
    gpus: u64,
    tp: u64,
    pp: u64,
    gb: u64,
    tflops: f64,
}

const NAR: [NarRow; 10] = [
    NarRow {
        model: "megatron-1.7b",
        gpus: 32,
        tp: 1,
        pp: 1,
        gb: 512,
        tflops: 137.0,
    },
    NarRow {
        model: "megatron-3.6b",
        gpus: 64,
        tp: 2,
        pp: 1,
        gb: 512,
        tflops: 138.0,
    },
    NarRow {
        model: "megatron-7.5b",
        gpus: 128,
        tp: 4,
        pp: 1,
        gb: 512,
        tflops: 142.0,
    },
    NarRow {
        model: "megatron-18.4b",
        gpus: 256,
        tp: 8,
        pp: 1,
        gb: 1024,
        tflops: 135.0,
    },
    NarRow {
        model: "megatron-39.1b",
        gpus: 512,
        tp: 8,
        pp: 2,
        gb: 1536,
        tflops: 138.0,
    },
    NarRow {
        model: "megatron-76.1b",
        gpus: 1024,
        tp: 8,
        pp: 4,
        gb: 1792,
        tflops: 140.0,
    },
    NarRow {
        model: "megatron-145.6b",
        gpus: 1536,
        tp: 8,
        pp: 8,
        gb: 2304,
        tflops: 148.0,
    },
    NarRow {
        model: "megatron-310.1b",
        gpus: 1920,
        tp: 8,
        pp: 16,
        gb: 2160,
        tflops: 155.0,
    },
    NarRow {
        model: "megatron-529.6b",
        gpus: 2520,
        tp: 8,
        pp: 35,
        gb: 2520,
        tflops: 163.0,
    },
    NarRow {
        model: "megatron-1t",
        gpus: 3072,
        tp: 8,
        pp: 64,
        gb: 3072,
        tflops: 163.0,
    },
];

/// Narayanan et al. 2021 Table 1: achieved TFLOP/s per GPU, counted with the paper's eq. 3,
/// F = 96·B·s·l·h²·(1 + s/(6h) + V/(16·l·h)) (full recompute), divided by our predicted step
/// time and the GPU count. The paper does not give micro-batch sizes: we take the fastest
/// micro-batch in {1, 2, 4, 8} that fits in memory (what the authors tuned for), full
/// recompute, vpp 1, gradient all-reduce not overlapped (Megatron-LM of 2021).
pub fn narayanan_table1(calib: &Calibration) -> Vec<Row> {
    let mut rows = Vec::new();
    for k in &NAR {
        let model = preset(k.model).expect("preset");
        let gpu = gpu_preset("a100-80gb").expect("preset");
        let cluster = ClusterSpec::new(gpu, k.gpus, Some(8), None).expect("valid cluster");
        let ctx = Context {
            model: model.clone(),
            cluster,
            recipe: megatron_recipe(k.gb, Recompute::Full),
            calib: *calib,
        };
        let dp = k.gpus / (k.tp * k.pp);
        let mut best: Option<f64> = None;
        for mb in [1u64, 2, 4, 8] {
            let per_dp = k.gb / dp;
            if per_dp % mb != 0 {
                continue;
            }
            let layout = Layout {
                dp,
                tp: k.tp,
                pp: k.pp,
                cp: 1,
                ep: 1,
                vpp: 1,
                sp: false,
                zero: 0,
                micro_batch: mb,
                grad_accum: per_dp / mb,
                stage_layers: StageLayers::spread(model.layers, k.pp),
                partition: Partition::Even,
            };
            if layout.validate(&model, k.gpus, k.gb).is_err() {
                continue;
            }
            let ev = ctx.evaluate(&layout, &mut NoTrace);
            if ev.fits {
                best = Some(best.map_or(ev.time.total, |b: f64| b.min(ev.time.total)));
            }
        }
        let secs = best.expect("some micro-batch fits");
        let (b, s, l, h, v) = (
            k.gb as f64,
            model.seq_len as f64,
            model.layers as f64,
            model.hidden as f64,
            model.vocab as f64,
        );
        let f = 96.0 * b * s * l * h * h * (1.0 + s / (6.0 * h) + v / (16.0 * l * h));
        let predicted = f / secs / k.gpus as f64 / 1e12;
        rows.push(Row {
            id: k.model,
            metric: "achieved TFLOP/s per GPU",
            published: k.tflops,
            predicted,
            unit: "TFLOP/s",
            rel_error: (predicted - k.tflops) / k.tflops,
            source: "Narayanan et al. 2021 (arXiv 2104.04473) Table 1",
        });
    }
    rows
}
