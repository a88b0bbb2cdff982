// One AdamW step (decoupled weight decay, bias-corrected moments) on param: [n] f32 in place,
// with its moments m and v, from grad · grad_scale (the scale averages accumulated gradients
// and applies clipping). c1 = 1 − β1^step and c2 = 1 − β2^step come from the CPU.

struct Params {
    n: u32,
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    c1: f32,
    c2: f32,
    grad_scale: f32,
}

@group(0) @binding(0) var<storage, read_write> param: array<f32>;
@group(0) @binding(1) var<storage, read> grad: array<f32>;
@group(0) @binding(2) var<storage, read_write> m: array<f32>;
@group(0) @binding(3) var<storage, read_write> v: array<f32>;
@group(0) @binding(4) var<uniform> p: Params;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 64u;
    if (i >= p.n) {
        return;
    }
    let g = grad[i] * p.grad_scale;
    let mi = p.beta1 * m[i] + (1.0 - p.beta1) * g;
    let vi = p.beta2 * v[i] + (1.0 - p.beta2) * g * g;
    m[i] = mi;
    v[i] = vi;
    let decayed = param[i] * (1.0 - p.lr * p.weight_decay);
    param[i] = decayed - p.lr * (mi / p.c1) / (sqrt(vi / p.c2) + p.eps);
}
