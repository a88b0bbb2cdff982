//! The conformance cases of training's ops: the backward kernels, the LoRA factors' products
//! and the optimizer, against `reference::backward` (itself checked against finite
//! differences).

use super::*;

/// dx = dy · W for every weight type and shape, into a fresh dx and added to one, and a
/// matrix taller than one dispatch walks (the recorder splits its rows).
pub(super) async fn product_backward(gpu: &Gpu) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    for ty in weight_types(gpu) {
        let mut cases: Vec<(usize, usize)> = shapes(ty).into_iter().take(4).collect();
        cases.push((20_000, ty.block_elems().max(8)));
        for (i, (n_rows, k)) in cases.into_iter().enumerate() {
            let (bytes, w) = random_matrix(ty, n_rows, k, 1100 + i as u64)?;
            let wm = GpuMatrix::upload(gpu, "w", ty, k as u64, n_rows as u64, &bytes).await?;
            for m in [1usize, 5, 11] {
                let mut rng = Rng::new(1200 + (i * 8 + m) as u64);
                let (dy, prior) = (rng.fill(m * n_rows, 1.0), rng.fill(m * k, 1.0));
                let (dyb, dx, dx_acc) = (gpu.upload_f32("dy", &dy).await?, gpu.storage("dx", (m * k * 4) as u64).await?, gpu.upload_f32("dx prior", &prior).await?);
                let mut rec = Recorder::new(gpu);
                rec.product_backward(&wm, &dyb, &dx, m as u32, false).await?;
                rec.product_backward(&wm, &dyb, &dx_acc, m as u32, true).await?;
                rec.submit()?;
                let want = reference::matmul_backward(&w, &dy, n_rows, k, m);
                checks.push(Check::nmse(format!("product_backward {ty} {n_rows}x{k} m={m}"), &gpu.read_f32(&dx, 0, m * k).await?, &want, MATMUL_NMSE));
                let want_acc = reference::add(&prior, &want);
                checks.push(Check::nmse(
                    format!("product_backward {ty} {n_rows}x{k} m={m} accumulated"),
                    &gpu.read_f32(&dx_acc, 0, m * k).await?,
                    &want_acc,
                    MATMUL_NMSE,
                ));
                // dy broadcast over a subgroup (where the device and rows allow) forced on and off,
                // whatever the rows' count chose above
                // and PAIRED forced on and off for the types that have it (for the others both
                // would run the same kernel)
                let paired_modes: &[bool] = if crate::ops::product_backward_pairs(ty) { &[true, false] } else { &[false] };
                let modes = [true, false].into_iter().flat_map(|b| paired_modes.iter().map(move |&p| (b, p)));
                for (broadcast, paired) in modes.filter(|_| m == 11) {
                    let mut rec = Recorder::new(gpu);
                    rec.backward_broadcast = Some(broadcast);
                    rec.backward_paired = Some(paired);
                    rec.product_backward(&wm, &dyb, &dx, m as u32, false).await?;
                    rec.submit()?;
                    checks.push(Check::nmse(
                        format!("product_backward {ty} {n_rows}x{k} m={m} broadcast {broadcast} paired {paired}"),
                        &gpu.read_f32(&dx, 0, m * k).await?,
                        &want,
                        MATMUL_NMSE,
                    ));
                }
            }
        }
        // each part of a stacked matrix (q/k/v-like) on its own
        let (_, k) = shapes(ty)[2];
        let rows = [13usize, 5, 7];
        let (stacked, parts) = random_stacked(gpu, ty, &rows, k, 1250).await?;
        for (part, &r) in rows.iter().enumerate() {
            let m = 3;
            let dy = Rng::new(1260 + part as u64).fill(m * r, 1.0);
            let (dyb, dx) = (gpu.upload_f32("dy", &dy).await?, gpu.storage("dx", (m * k * 4) as u64).await?);
            let mut rec = Recorder::new(gpu);
            rec.product_backward_part(&stacked, part, &dyb, &dx, m as u32, false).await?;
            rec.submit()?;
            let want = reference::matmul_backward(&parts[part].1, &dy, r, k, m);
            checks.push(Check::nmse(format!("product_backward {ty} part {part} ({r} of 13+5+7 rows) x{k}"), &gpu.read_f32(&dx, 0, m * k).await?, &want, MATMUL_NMSE));
        }
    }
    Ok(checks)
}

/// dw += scale · dyᵀ · x, dy a column range of a wider output (a fused tensor's part).
pub(super) async fn weight_gradient(gpu: &Gpu) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    // (rows, k, tokens, dy's width, the rows' first column in it)
    for (i, (n_rows, k, m, stride, offset)) in
        [(5usize, 7usize, 3usize, 5usize, 0usize), (8, 64, 33, 20, 6), (8, 64, 33, 24, 8), (576, 8, 70, 1728, 1152), (1, 1, 1, 1, 0)].into_iter().enumerate()
    {
        let mut rng = Rng::new(1300 + i as u64);
        let (dy, x, prior) = (rng.fill(m * stride, 1.0), rng.fill(m * k, 1.0), rng.fill(n_rows * k, 1.0));
        let part: Vec<f32> = (0..m).flat_map(|t| dy[t * stride + offset..][..n_rows].to_vec()).collect();
        let want = reference::add(&prior, &reference::scale(&reference::weight_gradient(&part, &x, n_rows, k, m), 0.5));
        let (dyb, xb) = (gpu.upload_f32("dy", &dy).await?, gpu.upload_f32("x", &x).await?);
        // the scalar kernel, and TILES where the shape allows it
        for tiles in [false, true] {
            let dw = gpu.upload_f32("dw", &prior).await?;
            let mut rec = Recorder::new(gpu);
            rec.lora_tiles = Some(tiles);
            rec.weight_gradient(&dyb, &xb, &dw, n_rows as u32, k as u32, m as u32, stride as u32, offset as u32, 0.5).await?;
            rec.submit()?;
            let name = format!("weight_gradient {n_rows}x{k} m={m} of {stride} at {offset}{}", if tiles { " (tiles where aligned)" } else { "" });
            checks.push(Check::nmse(name, &gpu.read_f32(&dw, 0, n_rows * k).await?, &want, MATMUL_NMSE));
        }
    }
    Ok(checks)
}

pub(super) async fn rms_norm_backward(gpu: &Gpu) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    for (i, (rows, n)) in NORM_SHAPES.into_iter().enumerate() {
        let mut rng = Rng::new(1400 + i as u64);
        let (x, w, dy, prior) = (rng.fill(rows * n, 2.0), rng.fill(n, 1.5), rng.fill(rows * n, 1.0), rng.fill(rows * n, 1.0));
        let (xb, wb, dyb) = (gpu.upload_f32("x", &x).await?, gpu.upload_f32("w", &w).await?, gpu.upload_f32("dy", &dy).await?);
        let (dx, dx_acc) = (gpu.storage("dx", (rows * n * 4) as u64).await?, gpu.upload_f32("dx prior", &prior).await?);
        let mut rec = Recorder::new(gpu);
        rec.rms_norm_backward(&xb, &wb, &dyb, &dx, n as u32, rows as u32, 1e-6, false).await?;
        rec.rms_norm_backward(&xb, &wb, &dyb, &dx_acc, n as u32, rows as u32, 1e-6, true).await?;
        rec.submit()?;
        let want = reference::rms_norm_backward(&x, &w, &dy, n, 1e-6);
        checks.push(Check::nmse(format!("rms_norm_backward {rows}x{n}"), &gpu.read_f32(&dx, 0, rows * n).await?, &want, MATMUL_NMSE));
        let want_acc = reference::add(&prior, &want);
        checks.push(Check::nmse(format!("rms_norm_backward {rows}x{n} accumulated"), &gpu.read_f32(&dx_acc, 0, rows * n).await?, &want_acc, MATMUL_NMSE));
    }
    Ok(checks)
}

pub(super) async fn glu_backward(gpu: &Gpu) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    for (i, n) in [1usize, 1000, 65_537].into_iter().enumerate() {
        let mut rng = Rng::new(1500 + i as u64);
        // gates out to ±12: both activations' saturated ends
        let (gate, up, d) = (rng.fill(n, 12.0), rng.fill(n, 2.0), rng.fill(n, 1.0));
        let (gb, ub, db) = (gpu.upload_f32("gate", &gate).await?, gpu.upload_f32("up", &up).await?, gpu.upload_f32("d act", &d).await?);
        for gelu in [false, true] {
            let (dg, du) = (gpu.storage("d gate", (n * 4) as u64).await?, gpu.storage("d up", (n * 4) as u64).await?);
            let mut rec = Recorder::new(gpu);
            rec.glu_backward(&gb, &ub, &db, &dg, &du, n as u32, gelu).await?;
            rec.submit()?;
            let (want_g, want_u) = if gelu { reference::gelu_gate_backward(&gate, &up, &d) } else { reference::silu_gate_backward(&gate, &up, &d) };
            let name = if gelu { "gelu" } else { "silu" };
            checks.push(Check::nmse(format!("glu_backward {name} d_gate n={n}"), &gpu.read_f32(&dg, 0, n).await?, &want_g, MATMUL_NMSE));
            checks.push(Check::nmse(format!("glu_backward {name} d_up n={n}"), &gpu.read_f32(&du, 0, n).await?, &want_u, MATMUL_NMSE));
        }
    }
    Ok(checks)
}

/// Rows over vocabularies of every size the models have, with positions not trained on
/// (weight 0) and a half weight among them.
pub(super) async fn cross_entropy(gpu: &Gpu) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    for (i, (rows, n_vocab)) in [(3usize, 1000usize), (5, 49_152), (2, 262_144), (1, 7)].into_iter().enumerate() {
        let mut rng = Rng::new(1600 + i as u64);
        let logits = rng.fill(rows * n_vocab, 8.0);
        let targets: Vec<u32> = (0..rows).map(|t| ((t * 7919 + 13) % n_vocab) as u32).collect();
        let weights: Vec<f32> = (0..rows).map(|t| [1.0, 0.0, 0.5][t % 3]).collect();
        let (lb, tb, wb) = (gpu.upload_f32("logits", &logits).await?, gpu.upload_u32("targets", &targets).await?, gpu.upload_f32("weights", &weights).await?);
        let (grad, loss) = (gpu.storage("grad", (rows * n_vocab * 4) as u64).await?, gpu.storage("loss", (rows * 4) as u64).await?);
        let mut rec = Recorder::new(gpu);
        rec.cross_entropy(&lb, &tb, &wb, &grad, &loss, n_vocab as u32, rows as u32).await?;
        rec.submit()?;
        let (want_loss, want_grad) = reference::cross_entropy(&logits, &targets, &weights, n_vocab);
        checks.push(Check::nmse(format!("cross_entropy gradient {rows}x{n_vocab}"), &gpu.read_f32(&grad, 0, rows * n_vocab).await?, &want_grad, MATMUL_NMSE));
        let got_loss: f64 = gpu.read_f32(&loss, 0, rows).await?.iter().map(|v| *v as f64).sum();
        let error = if want_loss == 0.0 { got_loss.abs() } else { (got_loss - want_loss).abs() / want_loss.abs() };
        checks.push(Check {
            case: format!("cross_entropy loss {rows}x{n_vocab}"),
            metric: "relative",
            error: if error.is_nan() { f64::INFINITY } else { error },
            bound: 1e-5,
        });
    }
    Ok(checks)
}

pub(super) async fn adamw(gpu: &Gpu) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    for (i, (n, step)) in [(1000usize, 1u32), (65_537, 7), (3, 1000)].into_iter().enumerate() {
        let mut rng = Rng::new(1700 + i as u64);
        let (param, grad) = (rng.fill(n, 1.0), rng.fill(n, 0.1));
        let (m0, v0): (Vec<f32>, Vec<f32>) = (rng.fill(n, 0.01), (0..n).map(|_| rng.uniform().abs() * 1e-3).collect());
        let h = reference::AdamW { lr: 2e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, step };
        let (pb, gb, mb, vb) =
            (gpu.upload_f32("param", &param).await?, gpu.upload_f32("grad", &grad).await?, gpu.upload_f32("m", &m0).await?, gpu.upload_f32("v", &v0).await?);
        let mut rec = Recorder::new(gpu);
        rec.adamw(&pb, &gb, &mb, &vb, n as u32, h, 0.5).await?;
        rec.submit()?;
        let (mut want_p, mut want_m, mut want_v) = (param.clone(), m0.clone(), v0.clone());
        reference::adamw(&mut want_p, &reference::scale(&grad, 0.5), &mut want_m, &mut want_v, h);
        checks.push(Check::max_abs(format!("adamw n={n} step {step}: param"), &gpu.read_f32(&pb, 0, n).await?, &want_p, 1e-6));
        checks.push(Check::max_abs(format!("adamw n={n} step {step}: m"), &gpu.read_f32(&mb, 0, n).await?, &want_m, 1e-6));
        checks.push(Check::max_abs(format!("adamw n={n} step {step}: v"), &gpu.read_f32(&vb, 0, n).await?, &want_v, 1e-6));
    }
    Ok(checks)
}

/// dq, dk, dv of attention on the attention cases whose head size the backward pass takes
/// (multiples of 4), plus long ones that split every pass over several dispatches on llvmpipe
/// (for the scalar kernel and for the blocked ones, one with a window reaching back into a
/// cache), with each kernel the device can run.
pub(super) async fn attention_backward(gpu: &Gpu) -> Result<Vec<Check>> {
    use ops::{AttentionBackwardKernel, AttentionGrads};
    let mut checks = Vec::new();
    let mut cases: Vec<(u32, u32, u32, u32, u32, u32)> = ATTENTION_CASES.iter().copied().filter(|c| c.3 % 4 == 0 && c.4 <= 600).collect();
    cases.extend([(96, 6, 2, 128, 900, 0), (260, 3, 1, 64, 500, 0), (40, 4, 1, 64, 900, 256)]);
    for (ci, (n_q, n_head, n_kv_head, head_dim, pos0, window)) in cases.into_iter().enumerate() {
        let a = AttentionArgs { n_q, n_head, n_kv_head, head_dim, pos0, window, scale: 1.0 / (head_dim as f32).sqrt(), kv: KvType::F32 };
        let n_kv = (pos0 + n_q) as usize;
        let (qn, kn) = ((n_q * n_head * head_dim) as usize, n_kv * (n_kv_head * head_dim) as usize);
        let mut rng = Rng::new(1800 + ci as u64);
        let (q, k, v, dout) = (rng.fill(qn, 1.0), rng.fill(kn, 1.0), rng.fill(kn, 1.0), rng.fill(qn, 1.0));
        let (qb, kb, vb, db) = (gpu.upload_f32("q", &q).await?, gpu.upload_f32("k", &k).await?, gpu.upload_f32("v", &v).await?, gpu.upload_f32("dout", &dout).await?);
        let shape = super::reference_shape(&a);
        let (want_q, want_k, want_v) = reference::attention_backward(&q, &k, &v, &dout, shape);
        for mode in [AttentionBackwardKernel::Scalar, AttentionBackwardKernel::Tiled, AttentionBackwardKernel::Broadcast] {
            let mut rec = Recorder::new(gpu);
            rec.attention_backward_mode = Some(mode);
            if rec.attention_backward_kernel(&a) != mode {
                continue; // the device or the head size does not take it: another mode's case
            }
            let (dq, dk, dv) = (gpu.storage("dq", qn as u64 * 4).await?, gpu.storage("dk", kn as u64 * 4).await?, gpu.storage("dv", kn as u64 * 4).await?);
            let stats = gpu.storage("stats", (n_q * n_head) as u64 * 16).await?;
            rec.attention_backward(&AttentionGrads { q: &qb, k: &kb, v: &vb, dout: &db, dq: &dq, dk: &dk, dv: &dv, stats: &stats }, a).await?;
            rec.submit()?;
            let name = format!("attention_backward {mode:?} q={n_q} heads {n_head}/{n_kv_head}x{head_dim} pos0={pos0} window={window}");
            checks.push(Check::nmse(format!("{name}: dq"), &gpu.read_f32(&dq, 0, qn).await?, &want_q, MATMUL_NMSE));
            checks.push(Check::nmse(format!("{name}: dk"), &gpu.read_f32(&dk, 0, kn).await?, &want_k, MATMUL_NMSE));
            checks.push(Check::nmse(format!("{name}: dv"), &gpu.read_f32(&dv, 0, kn).await?, &want_v, MATMUL_NMSE));
        }
    }
    Ok(checks)
}

/// LoRA-shaped products (rank rows, or rank-long rows), written and added with a scale.
pub(super) async fn skinny_product(gpu: &Gpu) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    for (i, (n_rows, k, m)) in [(8usize, 576usize, 50usize), (576, 8, 50), (4, 4, 1), (16, 1536, 70), (3, 12, 9)].into_iter().enumerate() {
        let mut rng = Rng::new(1900 + i as u64);
        let (w, x, prior) = (rng.fill(n_rows * k, 1.0), rng.fill(m * k, 1.0), rng.fill(m * n_rows, 1.0));
        let want = reference::matmul(&w, &x, n_rows, k, m);
        let want_acc = reference::add(&prior, &reference::scale(&want, -0.5));
        let wm = GpuMatrix::upload(gpu, "w", GgmlType::F32, k as u64, n_rows as u64, bytemuck::cast_slice(&w)).await?;
        let xb = gpu.upload_f32("x", &x).await?;
        // the one-output kernel, and TILES where the rows come in fours
        for tiles in [false, true] {
            let (y, y_acc) = (gpu.storage("y", (m * n_rows * 4) as u64).await?, gpu.upload_f32("y prior", &prior).await?);
            let mut rec = Recorder::new(gpu);
            rec.lora_tiles = Some(tiles);
            rec.skinny_product(&wm, &xb, &y, m as u32, 1.0, false).await?;
            rec.skinny_product(&wm, &xb, &y_acc, m as u32, -0.5, true).await?;
            rec.submit()?;
            let how = if tiles { " (tiles where the rows allow)" } else { "" };
            checks.push(Check::nmse(format!("skinny_product {n_rows}x{k} m={m}{how}"), &gpu.read_f32(&y, 0, m * n_rows).await?, &want, MATMUL_NMSE));
            checks.push(Check::nmse(
                format!("skinny_product {n_rows}x{k} m={m} added at -0.5{how}"),
                &gpu.read_f32(&y_acc, 0, m * n_rows).await?,
                &want_acc,
                MATMUL_NMSE,
            ));
        }
    }
    Ok(checks)
}
