//! Whole-model LoRA gradients: the GPU trainer's (`train::step`) against a CPU forward and
//! backward pass composed of `nomoat_runtime::reference` ops (each of those checked against
//! finite differences), on the tiny models of tests/data/tiny with factors on every target of
//! every layer: cosine ≥ 0.999 per tensor, and the same loss, which the inference forward pass
//! with the factors as an adapter gives too.

use nomoat_runtime::arch::{Activation, Config, RopeType};
use nomoat_runtime::conformance::Rng;
use nomoat_runtime::gguf::Gguf;
use nomoat_runtime::lora::LoraAdapter;
use nomoat_runtime::model::Model;
use nomoat_runtime::ops::KvType;
use nomoat_runtime::reference::{self as re, AttentionShape, RopeMode, RopeParams};
use nomoat_runtime::session::Session;
use nomoat_runtime::train::step::{memory_needed, Trainer, TARGETS};
use nomoat_runtime::{quant, train};
use nomoat_tests::gpu::variants;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

fn tiny(file: &str) -> (Gguf, std::fs::File) {
    let path = format!("{}/../tests/data/tiny/{file}", env!("CARGO_MANIFEST_DIR"));
    let mut f = std::fs::File::open(&path).unwrap();
    let len = f.metadata().unwrap().len();
    (Gguf::read_from(&mut f, len).unwrap(), f)
}

/// Every tensor of the file as f32 values.
fn weights(g: &Gguf, f: &mut std::fs::File) -> BTreeMap<String, Vec<f32>> {
    use std::io::{Read, Seek, SeekFrom};
    g.tensors
        .iter()
        .map(|t| {
            let r = g.tensor_data_range(t);
            let mut bytes = vec![0u8; (r.end - r.start) as usize];
            f.seek(SeekFrom::Start(r.start)).unwrap();
            f.read_exact(&mut bytes).unwrap();
            let n = t.dims.iter().product::<u64>() as usize;
            (t.name.clone(), quant::dequantize(t.ty, &bytes, n).unwrap())
        })
        .collect()
}

type Factors = BTreeMap<String, (Vec<f32>, Vec<f32>)>;

/// The CPU's forward and backward pass: (loss, name → (dA, dB)).
struct Cpu<'a> {
    c: &'a Config,
    w: &'a BTreeMap<String, Vec<f32>>,
    loras: &'a Factors,
    rank: usize,
    factor: f32,
    grads: Factors,
}

impl Cpu<'_> {
    fn w(&self, name: &str) -> &[f32] {
        self.w.get(name).unwrap_or_else(|| panic!("no tensor {name}"))
    }

    /// y = W·x (+ s·B·(A·x)) for W [n_out][k], x [m][k].
    fn project(&self, name: &str, x: &[f32], n_out: usize, k: usize, m: usize) -> Vec<f32> {
        let mut y = re::matmul(self.w(name), x, n_out, k, m);
        if let Some((a, b)) = self.loras.get(name) {
            let u = re::matmul(a, x, self.rank, k, m);
            let t = re::matmul(b, &u, n_out, self.rank, m);
            y = re::add(&y, &re::scale(&t, self.factor));
        }
        y
    }

    /// dx of project, the factors' gradients added.
    fn project_back(&mut self, name: &str, x: &[f32], dy: &[f32], n_out: usize, k: usize, m: usize) -> Vec<f32> {
        let mut dx = re::matmul_backward(self.w(name), dy, n_out, k, m);
        if let Some((a, b)) = self.loras.get(name) {
            let r = self.rank;
            let u = re::matmul(a, x, r, k, m);
            let db = re::scale(&re::weight_gradient(dy, &u, n_out, r, m), self.factor);
            let gs = re::scale(&re::matmul_backward(b, dy, n_out, r, m), self.factor);
            let da = re::weight_gradient(&gs, x, r, k, m);
            dx = re::add(&dx, &re::matmul_backward(a, &gs, r, k, m));
            let e = self.grads.entry(name.to_string()).or_insert_with(|| (vec![0.0; da.len()], vec![0.0; db.len()]));
            e.0 = re::add(&e.0, &da);
            e.1 = re::add(&e.1, &db);
        }
        dx
    }

    fn rope(&self, x: &mut [f32], heads: usize, l: usize, sign: f32) {
        let c = self.c;
        if !c.has_rope(l) {
            return;
        }
        let mode = if c.spec().rope == RopeType::Neox { RopeMode::Neox } else { RopeMode::Normal };
        let factors = self.w.get("rope_freqs.weight").map_or(&[][..], |f| f.as_slice());
        let p = RopeParams { mode, n_rot: c.n_rot, freq_base: c.rope_base_of(l), freq_scale: sign * c.rope_freq_scale() };
        re::rope_with_factors(x, heads, c.head_dim, 0, p, factors);
    }

    fn bias(&self, x: &[f32], name: &str, width: usize) -> Vec<f32> {
        match self.w.get(name) {
            Some(b) => x.iter().enumerate().map(|(i, v)| v + b[i % width]).collect(),
            None => x.to_vec(),
        }
    }

    /// RMS norm over rows of `width` where the model has the weight `name` (Qwen3's and
    /// Gemma 3's per-head q/k norms, Gemma 3's post-norms), else x as it is.
    fn norm_if(&self, x: &[f32], name: &str, width: usize) -> Vec<f32> {
        match self.w.get(name) {
            Some(w) => re::rms_norm(x, w, width, self.c.norm_eps),
            None => x.to_vec(),
        }
    }

    /// The gradient through `norm_if`.
    fn norm_if_back(&self, x: &[f32], name: &str, width: usize, dy: &[f32]) -> Vec<f32> {
        match self.w.get(name) {
            Some(w) => re::rms_norm_backward(x, w, dy, width, self.c.norm_eps),
            None => dy.to_vec(),
        }
    }

    fn run(&mut self, ids: &[u32], weights: &[f32]) -> f64 {
        let c = self.c;
        let (d, ff, qd, kvd, eps) = (c.n_embd, c.n_ff, c.n_head * c.head_dim, c.n_kv_head * c.head_dim, c.norm_eps);
        let gelu = c.spec().activation == Activation::GeluTanh;
        let m = ids.len() - 1;
        let embd = self.w("token_embd.weight").to_vec();
        let mut x: Vec<f32> = ids[..m].iter().flat_map(|&t| embd[t as usize * d..][..d].to_vec()).collect();
        if let Some(s) = c.embed_scale() {
            x = re::scale(&x, s);
        }
        struct Saved {
            x: Vec<f32>,
            n1: Vec<f32>,
            q_in: Vec<f32>, // before the per-head norms (where the model has them)
            k_in: Vec<f32>,
            o: Vec<f32>, // W_o·attn and W_down·act, before the post-norms
            f: Vec<f32>,
            q: Vec<f32>,
            k: Vec<f32>,
            v: Vec<f32>,
            attn: Vec<f32>,
            h: Vec<f32>,
            n2: Vec<f32>,
            gate: Vec<f32>,
            up: Vec<f32>,
            act: Vec<f32>,
        }
        let mut saved = Vec::new();
        for l in 0..c.n_layer {
            let p = |t: &str| format!("blk.{l}.{t}.weight");
            let n1 = re::rms_norm(&x, self.w(&p("attn_norm")), d, eps);
            let q_in = self.bias(&self.project(&p("attn_q"), &n1, qd, d, m), &format!("blk.{l}.attn_q.bias"), qd);
            let k_in = self.bias(&self.project(&p("attn_k"), &n1, kvd, d, m), &format!("blk.{l}.attn_k.bias"), kvd);
            let (mut q, mut k) = (self.norm_if(&q_in, &p("attn_q_norm"), c.head_dim), self.norm_if(&k_in, &p("attn_k_norm"), c.head_dim));
            let v = self.bias(&self.project(&p("attn_v"), &n1, kvd, d, m), &format!("blk.{l}.attn_v.bias"), kvd);
            self.rope(&mut q, c.n_head, l, 1.0);
            self.rope(&mut k, c.n_kv_head, l, 1.0);
            let window = c.window_of(l) as usize;
            let shape =
                AttentionShape { n_head: c.n_head, n_kv_head: c.n_kv_head, head_dim: c.head_dim, pos0: 0, window: (window > 0).then_some(window), scale: c.attn_scale };
            let attn = re::attention(&q, &k, &v, shape);
            let o = self.project(&p("attn_output"), &attn, d, qd, m);
            let h = re::add(&x, &self.norm_if(&o, &p("post_attention_norm"), d));
            let n2 = re::rms_norm(&h, self.w(&p("ffn_norm")), d, eps);
            let gate = self.project(&p("ffn_gate"), &n2, ff, d, m);
            let up = self.project(&p("ffn_up"), &n2, ff, d, m);
            let act = if gelu { re::gelu_gate(&gate, &up) } else { re::silu_gate(&gate, &up) };
            let f = self.project(&p("ffn_down"), &act, d, ff, m);
            let out = re::add(&h, &self.norm_if(&f, &p("post_ffw_norm"), d));
            saved.push(Saved { x, n1, q_in, k_in, o, f, q, k, v, attn, h, n2, gate, up, act });
            x = out;
        }
        let out_norm = self.w("output_norm.weight").to_vec();
        let head = self.w.get("output.weight").unwrap_or(&embd).clone();
        let n = re::rms_norm(&x, &out_norm, d, eps);
        let logits = re::matmul(&head, &n, c.n_vocab, d, m);
        let (loss, d_logits) = re::cross_entropy(&logits, &ids[1..], &weights[1..], c.n_vocab);
        let dn = re::matmul_backward(&head, &d_logits, c.n_vocab, d, m);
        let mut dx = re::rms_norm_backward(&x, &out_norm, &dn, d, eps);
        for l in (0..c.n_layer).rev() {
            let s = &saved[l];
            let p = |t: &str| format!("blk.{l}.{t}.weight");
            let df = self.norm_if_back(&s.f, &p("post_ffw_norm"), d, &dx);
            let d_act = self.project_back(&p("ffn_down"), &s.act, &df, d, ff, m);
            let (dg, du) = if gelu { re::gelu_gate_backward(&s.gate, &s.up, &d_act) } else { re::silu_gate_backward(&s.gate, &s.up, &d_act) };
            let dn2 = re::add(&self.project_back(&p("ffn_gate"), &s.n2, &dg, ff, d, m), &self.project_back(&p("ffn_up"), &s.n2, &du, ff, d, m));
            let dh = re::add(&dx, &re::rms_norm_backward(&s.h, self.w(&p("ffn_norm")), &dn2, d, eps));
            let d_o = self.norm_if_back(&s.o, &p("post_attention_norm"), d, &dh);
            let d_attn = self.project_back(&p("attn_output"), &s.attn, &d_o, d, qd, m);
            let window = c.window_of(l) as usize;
            let shape =
                AttentionShape { n_head: c.n_head, n_kv_head: c.n_kv_head, head_dim: c.head_dim, pos0: 0, window: (window > 0).then_some(window), scale: c.attn_scale };
            let (mut dq, mut dk, dv) = re::attention_backward(&s.q, &s.k, &s.v, &d_attn, shape);
            self.rope(&mut dq, c.n_head, l, -1.0);
            self.rope(&mut dk, c.n_kv_head, l, -1.0);
            let (dq, dk) = (self.norm_if_back(&s.q_in, &p("attn_q_norm"), c.head_dim, &dq), self.norm_if_back(&s.k_in, &p("attn_k_norm"), c.head_dim, &dk));
            let dn1 = re::add(
                &re::add(&self.project_back(&p("attn_q"), &s.n1, &dq, qd, d, m), &self.project_back(&p("attn_k"), &s.n1, &dk, kvd, d, m)),
                &self.project_back(&p("attn_v"), &s.n1, &dv, kvd, d, m),
            );
            dx = re::add(&dh, &re::rms_norm_backward(&s.x, self.w(&p("attn_norm")), &dn1, d, eps));
        }
        loss
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

fn check(file: &str) {
    let (gguf, mut f) = tiny(file);
    let w = weights(&gguf, &mut f);
    let targets: Vec<&str> = TARGETS.iter().map(|t| t.0).collect();
    let (rank, alpha) = (4u32, 8.0f32);
    let ids: Vec<u32> = {
        let mut rng = Rng::new(77);
        (0..40).map(|_| (rng.next_u64() % 250) as u32 + 10).collect()
    };
    // the first tokens are a prompt (not trained on), the rest two replies with a turn between
    // them (the output head packs the positions with a loss)
    let weights_per_position: Vec<f32> = (0..ids.len()).map(|i| if i < 10 || (24..29).contains(&i) { 0.0 } else { 1.0 }).collect();
    for gpu in variants() {
        let model = pollster::block_on(Model::load(&gguf, gpu, &mut f, &mut |_, _| {})).unwrap();
        let mut trainer = pollster::block_on(Trainer::new(&model, gpu, &targets, rank, alpha, 64, 5)).unwrap();
        // the memory formula (what refuses a run before it starts) is what was allocated
        assert_eq!(memory_needed(&model.config, &targets, rank, 64), trainer.bytes, "{file}: memory_needed");
        // nonzero B everywhere, so that every A has a gradient too
        let mut rng = Rng::new(9);
        let mut loras = Factors::new();
        for (name, p) in &trainer.pairs {
            let a = rng.fill((p.a.n_rows * p.a.k) as usize, 0.3);
            let b = rng.fill((p.b.n_rows * p.b.k) as usize, 0.3);
            trainer.set_factors(name, &a, &b).unwrap();
            loras.insert(name.clone(), (a, b));
        }
        let loss = pollster::block_on(trainer.accumulate(&ids, &weights_per_position)).unwrap();
        let got = pollster::block_on(trainer.gradients()).unwrap();
        // the loss alone (validation) is the same and leaves the gradients as they are
        let loss_only = pollster::block_on(trainer.loss(&ids, &weights_per_position)).unwrap();
        assert_eq!(loss_only, loss, "{file}: loss without the backward pass");
        assert_eq!(pollster::block_on(trainer.gradients()).unwrap(), got, "{file}: loss() changed the gradients");
        // the inference forward pass (the one that matches llama.cpp) with these factors as an
        // adapter gives the same loss: the training graph is the model's graph
        let bytes = pollster::block_on(trainer.adapter_gguf("check")).unwrap();
        let adapter = pollster::block_on(LoraAdapter::load("check", &Gguf::parse(&bytes).unwrap(), &mut bytes.as_slice(), gpu, &model.config, &gguf)).unwrap();
        let mut session = pollster::block_on(Session::new(&model, gpu, 64, KvType::F32, true)).unwrap();
        pollster::block_on(session.set_adapters(vec![(Arc::new(adapter), 1.0)])).unwrap();
        let m = ids.len() - 1;
        pollster::block_on(session.eval(&ids[..m])).unwrap();
        let logits = pollster::block_on(session.batch_logits(m)).unwrap();
        let (inference_loss, _) = re::cross_entropy(&logits, &ids[1..], &weights_per_position[1..], model.config.n_vocab);
        let mut cpu = Cpu { c: &model.config, w: &w, loras: &loras, rank: rank as usize, factor: trainer.factor(), grads: Factors::new() };
        let want_loss = cpu.run(&ids, &weights_per_position);
        let label = format!("{file} [{}]", gpu.variant.label());
        assert!((loss - want_loss).abs() <= 1e-4 * want_loss.abs(), "{label}: loss {loss} against {want_loss}");
        assert!((loss - inference_loss).abs() <= 1e-4 * loss.abs(), "{label}: loss {loss}, through inference {inference_loss}");
        assert_eq!(got.len(), cpu.grads.len(), "{label}: trained tensors");
        assert_eq!(got.len(), model.config.n_layer * 7);
        let mut worst = (1.0f64, String::new());
        for (name, (ga, gb)) in &got {
            let (wa, wb) = &cpu.grads[name];
            for (what, g, want) in [("A", ga, wa), ("B", gb, wb)] {
                // a NaN cosine counts as the worst
                let cos = cosine(g, want);
                if cos.is_nan() || cos < worst.0 {
                    worst = (cos, format!("{name} d{what}"));
                }
            }
        }
        assert!(worst.0 >= 0.999, "{label}: cosine {} for {}", worst.0, worst.1);
        // the CPU composition itself against central differences of its own loss, at the
        // largest gradient element of two factors
        for (name, which) in [("blk.0.attn_q.weight", 0usize), ("blk.1.ffn_down.weight", 1)] {
            let g = if which == 0 { &cpu.grads[name].0 } else { &cpu.grads[name].1 };
            let i = (0..g.len()).max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs())).unwrap();
            let h = 1e-2f32;
            let loss_at = |delta: f32| {
                let mut l2 = loras.clone();
                let e = l2.get_mut(name).unwrap();
                if which == 0 {
                    e.0[i] += delta;
                } else {
                    e.1[i] += delta;
                }
                Cpu { c: &model.config, w: &w, loras: &l2, rank: rank as usize, factor: trainer.factor(), grads: Factors::new() }.run(&ids, &weights_per_position)
            };
            let numeric = (loss_at(h) - loss_at(-h)) / (2.0 * h as f64);
            assert!((numeric - g[i] as f64).abs() <= 0.02 * (g[i] as f64).abs(), "{label}: {name} d{} [{i}]: {} analytic, {numeric} numeric", ["A", "B"][which], g[i]);
        }
        eprintln!("{label}: loss {loss:.5} (CPU {want_loss:.5}), worst gradient cosine {:.6} ({})", worst.0, worst.1);
        // a second sequence adds to the gradients; zero_grads clears them
        trainer.zero_grads().unwrap();
        assert!(pollster::block_on(trainer.gradients()).unwrap().values().all(|(a, b)| a.iter().chain(b).all(|v| *v == 0.0)));
    }
}

#[test]
fn llama_gradients_match_the_cpu() {
    check("llama-tiny.gguf");
}

#[test]
fn mixed_quant_llama_gradients_match_the_cpu() {
    check("llama-mixed-tiny.gguf");
}

#[test]
fn qwen2_gradients_match_the_cpu() {
    check("qwen2-tiny.gguf");
}

/// SmolLM3's layers without RoPE (every fourth): the gradient skips the rotation there too.
#[test]
fn smollm3_gradients_match_the_cpu() {
    check("smollm3-tiny.gguf");
}

/// Llama 3's RoPE frequency factors (rope_freqs.weight), turning back by the same angles.
#[test]
fn llama3_gradients_match_the_cpu() {
    check("llama3-tiny.gguf");
}

/// Per-head q/k norms before RoPE.
#[test]
fn qwen3_gradients_match_the_cpu() {
    check("qwen3-tiny.gguf");
}

/// Gemma 3: per-head q/k norms, post-norms on both branches, tanh-GELU, scaled embeddings,
/// and (the swa model) sliding-window layers with their own RoPE base.
#[test]
fn gemma3_gradients_match_the_cpu() {
    check("gemma3-tiny.gguf");
    check("gemma3-swa-tiny.gguf");
}

#[test]
fn fused_projections_are_refused_by_name() {
    let gpu = &variants()[0];
    let (gguf, mut f) = tiny("phi3-tiny.gguf");
    let model = pollster::block_on(Model::load(&gguf, gpu, &mut f, &mut |_, _| {})).unwrap();
    let e = pollster::block_on(Trainer::new(&model, gpu, &["q"], 4, 8.0, 64, 1)).err().expect("refused");
    assert!(e.to_string().contains("phi3") && e.to_string().contains("not supported yet"), "{e}");
    let _ = train::data::Format::Text;
}

/// The README's table of what fine-tuning needs is this formula's: rank 8 on every projection,
/// sequences of 512 tokens, for the real models the tests use (their headers) and for common
/// 1B and 3B shapes (their configurations; weights as their Q4_K_M files' sizes).
#[test]
fn readme_memory_table_is_the_formula() {
    use nomoat_runtime::arch::Config;
    use nomoat_tests::support::{model_path, GEMMA3, QWEN2, SMOLLM2};
    let targets: Vec<&str> = TARGETS.iter().map(|t| t.0).collect();
    let header = |file: &str| {
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut std::io::Read::take(std::fs::File::open(model_path(file)).unwrap(), 16 << 20), &mut bytes).unwrap();
        let g = match Gguf::parse_prefix(&bytes).unwrap() {
            nomoat_runtime::gguf::Parse::Complete(g) => g,
            _ => panic!("{file}: header over 16 MiB"),
        };
        let c = Config::from_gguf(&g).unwrap();
        let (weights, _) = Model::memory_needed(&g, &c, 0, KvType::F32);
        (c, weights)
    };
    let mut rows = Vec::new();
    for (name, file) in [("SmolLM2 135M Q4_1", SMOLLM2), ("Gemma 3 270M Q4_K_M", GEMMA3), ("Qwen2.5-Coder 0.5B", QWEN2)] {
        let (c, w) = header(file);
        rows.push((name.to_string(), c, w));
    }
    // llama shapes: (layers, width, n_ff, heads, kv heads, head size, vocabulary, Q4_K_M bytes)
    let (base, _) = header(SMOLLM2);
    for (name, (l, d, ff, h, kv, hd, v, w)) in
        [("Llama 3.2 1B Q4_K_M", (16, 2048, 8192, 32, 8, 64, 128256, 807_690_656u64)), ("Llama 3.2 3B Q4_K_M", (28, 3072, 8192, 24, 8, 128, 128256, 2_019_377_696))]
    {
        let c = Config { n_layer: l, n_embd: d, n_ff: ff, n_head: h, n_kv_head: kv, head_dim: hd, n_vocab: v, ..base.clone() };
        rows.push((name.to_string(), c, w));
    }
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).unwrap();
    let mib = |b: u64| b.div_ceil(1 << 20);
    for (name, c, weights) in rows {
        let (adapters, activations) = memory_needed(&c, &targets, 8, 512);
        let row = format!("| {name} | {} | {} | {} | {} |", mib(weights), mib(adapters), mib(activations), mib(weights + adapters + activations));
        eprintln!("{row}");
        assert!(readme.contains(&row), "README.md lacks the row\n{row}");
    }
}
