// Plain f32 copy, four values per invocation: the yardstick for how fast this device streams
// memory through a compute shader (the benchmark compares every matvec against it).

struct Params {
    n4: u32,   // number of vec4s
}

@group(0) @binding(0) var<storage, read> src: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> dst: array<vec4<f32>>;
@group(0) @binding(2) var<uniform> p: Params;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i < p.n4) {
        dst[i] = src[i];
    }
}
