//! 16-bit storage through the kernels: each result is compared with the `f32` kernel run on the
//! same (already rounded) inputs, so the only differences are the output rounding (one unit
//! roundoff `u` of the format, relative) and the different `f32` summation order of the blocked
//! GEMM (far below `u`); below the normal range the rounding step is absolute (half the
//! subnormal spacing). Sizes exceed one block in every dimension.

use crate::attention::{attention_backward, attention_forward, attention_probs};
use crate::elem::{Bf16, Elem, F16};
use crate::matmul::{matmul_backward, matmul_forward};
use crate::rng::Rng;
use crate::testutil::{assert_close, randn};
use crate::Par;

fn round<E: Elem>(x: &[f32]) -> (Vec<E>, Vec<f32>) {
    let e: Vec<E> = x.iter().map(|&v| E::from_f32(v)).collect();
    let back = e.iter().map(|v| v.to_f32()).collect();
    (e, back)
}

fn widen<E: Elem>(x: &[E]) -> Vec<f32> {
    x.iter().map(|v| v.to_f32()).collect()
}

/// `|got − want| ≤ u·(|want| + 2·bound) + tiny` elementwise, where `bound` = |a|·|b| (the
/// products' magnitudes): the output rounding (u·|want|) plus, on the AMX path, an `f32`
/// operand rounded to bf16 (each product off by ≤ u·|product|, twice for safety).
#[track_caller]
fn assert_within(name: &str, got: &[f32], want: &[f32], bound: &[f32], u: f32) {
    for (i, ((&g, &w), &b)) in got.iter().zip(want).zip(bound).enumerate() {
        let tol = u * (w.abs() + 2.0 * b) + 1e-6;
        assert!(
            (g - w).abs() <= tol,
            "{name}[{i}]: got {g}, want {w} (tolerance {tol})"
        );
    }
}

fn abs(x: &[f32]) -> Vec<f32> {
    x.iter().map(|v| v.abs()).collect()
}

fn matmul_case<E: Elem>() {
    let (m, k, n) = (300, 530, 600);
    let mut rng = Rng::new(21);
    let (inp, inp32) = round::<E>(&randn(&mut rng, m * k, 1.0));
    let (w, w32) = round::<E>(&randn(&mut rng, n * k, 0.05));
    let (bias, bias32) = round::<E>(&randn(&mut rng, n, 1.0));
    let u = E::UNIT_ROUNDOFF;
    let mut want = vec![0.0f32; m * n];
    matmul_forward(&mut want, &inp32, &w32, Some(&bias32), m, k, n, Par::Seq);
    let mut bound = vec![0.0f32; m * n];
    matmul_forward(
        &mut bound,
        &abs(&inp32),
        &abs(&w32),
        None,
        m,
        k,
        n,
        Par::Seq,
    );
    for par in [Par::Seq, Par::Threads(3)] {
        let mut out = vec![E::default(); m * n];
        matmul_forward(&mut out, &inp, &w, Some(&bias), m, k, n, par);
        // Both operands are exact in E: only the output rounding and the summation order.
        assert_close(E::NAME, &widen(&out), &want, u, 1e-5);
        let mut out32 = vec![0.0f32; m * n];
        matmul_forward(&mut out32, &inp, &w, Some(&bias), m, k, n, par);
        assert_close(E::NAME, &out32, &want, 1e-5, 1e-5);
    }
    // Backward: d_out f32 (an activation gradient), d_w and d_b 16-bit, accumulated.
    let d_out = randn(&mut rng, m * n, 1.0);
    let (dw0, dw0_32) = round::<E>(&randn(&mut rng, n * k, 1.0));
    let (db0, db0_32) = round::<E>(&randn(&mut rng, n, 1.0));
    let (mut want_inp, mut want_w, mut want_b) = (vec![0.0; m * k], dw0_32.clone(), db0_32.clone());
    matmul_backward(
        &mut want_inp,
        &mut want_w,
        Some(&mut want_b),
        &d_out,
        &inp32,
        &w32,
        m,
        k,
        n,
        Par::Seq,
    );
    let (mut bound_inp, mut bound_w) = (vec![0.0; m * k], vec![0.0; n * k]);
    let (ad, ai, aw) = (abs(&d_out), abs(&inp32), abs(&w32));
    matmul_backward(
        &mut bound_inp,
        &mut bound_w,
        None,
        &ad,
        &ai,
        &aw,
        m,
        k,
        n,
        Par::Seq,
    );
    let (mut d_inp, mut d_w, mut d_b) = (vec![0.0f32; m * k], dw0, db0);
    matmul_backward(
        &mut d_inp,
        &mut d_w,
        Some(&mut d_b),
        &d_out,
        &inp,
        &w,
        m,
        k,
        n,
        Par::Threads(2),
    );
    assert_within("d_inp", &d_inp, &want_inp, &bound_inp, u);
    // d_w = prior + Σ: the prior is exact in E, so the bound is the same plus its rounding.
    assert_within("d_w", &widen(&d_w), &want_w, &bound_w, u);
    assert_close("d_b", &widen(&d_b), &want_b, u, 1e-3);
}

#[test]
fn matmul_with_16_bit_storage_rounds_only_the_output() {
    matmul_case::<Bf16>();
    matmul_case::<F16>();
}

/// The f32-panel path for bf16, which CPUs without AMX take, also where AMX is available.
/// (`set_amx` is process-wide: tests running meanwhile may take either path; both are within
/// their tolerances.)
#[test]
fn bf16_on_f32_panels_when_amx_is_off() {
    crate::matmul::set_amx(false);
    let r = std::panic::catch_unwind(matmul_case::<Bf16>);
    crate::matmul::set_amx(true);
    r.unwrap();
}

/// The AMX kernel (where the CPU and OS allow it) against f32 on the same rounded inputs: odd
/// sizes (tails in every dimension), transposed views (backward), 16-bit and f32 outputs.
#[test]
fn amx_bf16_path_agrees_with_f32() {
    if !crate::matmul::amx_active() {
        eprintln!("AMX not available here: only the staged path is tested");
        return;
    }
    // set_amx is process-wide: other tests running meanwhile may take either path, and both
    // are within their tolerances.
    for (m, k, n) in [(33, 70, 17), (64, 32, 64), (100, 1000, 90)] {
        let mut rng = Rng::new(m as u64);
        let (inp, inp32) = round::<Bf16>(&randn(&mut rng, m * k, 1.0));
        let (w, w32) = round::<Bf16>(&randn(&mut rng, n * k, 0.1));
        let mut want = vec![0.0f32; m * n];
        matmul_forward(&mut want, &inp32, &w32, None, m, k, n, Par::Seq);
        let mut amx = vec![0.0f32; m * n];
        matmul_forward(&mut amx, &inp, &w, None, m, k, n, Par::Threads(2));
        assert_close("amx forward", &amx, &want, 1e-5, 1e-5);
        let d_out = randn(&mut rng, m * n, 1.0);
        let (mut want_inp, mut want_w) = (vec![0.0; m * k], vec![0.0; n * k]);
        matmul_backward(
            &mut want_inp,
            &mut want_w,
            None,
            &d_out,
            &inp32,
            &w32,
            m,
            k,
            n,
            Par::Seq,
        );
        let (mut bi, mut bw) = (vec![0.0; m * k], vec![0.0; n * k]);
        let (ad, ai, aw) = (abs(&d_out), abs(&inp32), abs(&w32));
        matmul_backward(&mut bi, &mut bw, None, &ad, &ai, &aw, m, k, n, Par::Seq);
        let (mut d_inp, mut d_w) = (vec![0.0f32; m * k], vec![Bf16::default(); n * k]);
        matmul_backward(
            &mut d_inp,
            &mut d_w,
            None,
            &d_out,
            &inp,
            &w,
            m,
            k,
            n,
            Par::Threads(2),
        );
        let u = Bf16::UNIT_ROUNDOFF;
        assert_within("amx d_inp", &d_inp, &want_inp, &bi, u);
        assert_within("amx d_w", &widen(&d_w), &want_w, &bw, u);
    }
}

fn attention_case<E: Elem>() {
    let (b, t, cl, nh) = (2, 70, 16, 2);
    let mut rng = Rng::new(22);
    let (qkv, qkv32) = round::<E>(&randn(&mut rng, b * t * 3 * cl, 1.0));
    let (mut want_out, mut want_att) = (vec![0.0; b * t * cl], vec![0.0; b * nh * t * t]);
    attention_forward(&mut want_out, &mut want_att, &qkv32, b, t, cl, nh, Par::Seq);
    let (mut out, mut att) = (
        vec![E::default(); b * t * cl],
        vec![E::default(); b * nh * t * t],
    );
    attention_forward(&mut out, &mut att, &qkv, b, t, cl, nh, Par::Threads(2));
    let (u, sub) = (E::UNIT_ROUNDOFF, E::SUBNORMAL_STEP / 2.0);
    assert_close("att", &widen(&att), &want_att, u, sub);
    assert_close("out", &widen(&out), &want_out, u, sub);
    let mut again = vec![E::default(); att.len()];
    attention_probs(&mut again, &qkv, b, t, cl, nh, Par::Seq);
    assert_eq!(again, att, "recomputed probabilities");
    // Backward from the saved (rounded) probabilities equals f32 backward from the same values.
    let d_out = randn(&mut rng, b * t * cl, 1.0);
    let att32 = widen(&att);
    let (mut want_dqkv, mut d_att) = (vec![0.0; b * t * 3 * cl], vec![0.0; b * t * t]);
    attention_backward(
        &mut want_dqkv,
        &mut d_att,
        &d_out,
        &qkv32,
        &att32,
        b,
        t,
        cl,
        nh,
        Par::Seq,
    );
    let mut d_qkv = vec![0.0; b * t * 3 * cl];
    attention_backward(
        &mut d_qkv,
        &mut d_att,
        &d_out,
        &qkv,
        &att,
        b,
        t,
        cl,
        nh,
        Par::Seq,
    );
    assert_eq!(d_qkv, want_dqkv);
}

#[test]
fn attention_with_16_bit_storage_rounds_only_the_output() {
    attention_case::<Bf16>();
    attention_case::<F16>();
    // f32: the recomputed probabilities are bitwise the forward's.
    let (b, t, cl, nh) = (2, 70, 16, 2);
    let qkv = randn(&mut Rng::new(23), b * t * 3 * cl, 1.0);
    let (mut out, mut att) = (vec![0.0; b * t * cl], vec![0.0f32; b * nh * t * t]);
    attention_forward(&mut out, &mut att, &qkv, b, t, cl, nh, Par::Threads(2));
    let mut again = vec![0.0f32; att.len()];
    attention_probs(&mut again, &qkv, b, t, cl, nh, Par::Threads(2));
    assert_eq!(again, att);
}
