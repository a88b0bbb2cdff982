//! Several sequences decoded together (`Session::step_slots`: one forward pass a step, each
//! sequence at its own position in its own slot of the cache) give each the greedy tokens it
//! gets decoded alone: different prompt lengths, sequences that stop early, and sequences that
//! join (prefilled into their slot) while the others are mid-decode.
//!
//! Near-ties: the batched pass sums in another order than the lone one (the q/k/v product and
//! RoPE are separate dispatches, products run four tokens a pass), so a sequence's token may
//! differ only at a step where its lone run's top-2 margin is under `near_tie`; from there the
//! two histories may legitimately part and the comparison of that sequence stops (as the model
//! tests against llama.cpp do).

use nomoat_runtime::gguf::Gguf;
use nomoat_runtime::model::Model;
use nomoat_runtime::ops::KvType;
use nomoat_runtime::session::{RowOut, Session, SlotStep, Want};
use nomoat_tests::gpu::variants;
use nomoat_tests::support::{model_path, GEMMA3, SMOLLM2};
use std::path::{Path, PathBuf};

/// One sequence of a run: its prompt, the tokens it generates, and the step of the batched run
/// at which it joins.
struct Seq {
    prompt: Vec<u32>,
    n_gen: usize,
    joins_at: usize,
}

/// Each step's (top-1, margin to the second) of greedy decoding.
type Trace = Vec<(u32, f32)>;

fn top1(best: &[(u32, f32)]) -> (u32, f32) {
    (best[0].0, best[0].1 - best.get(1).map_or(f32::NEG_INFINITY, |b| b.1))
}

fn load(path: &Path, gpu: &'static nomoat_runtime::device::Gpu) -> Model {
    let mut f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len();
    let gguf = Gguf::read_from(&mut f, len).unwrap();
    pollster::block_on(Model::load(&gguf, gpu, &mut f, &mut |_, _| {})).unwrap()
}

/// Greedy decoding of `seq` alone in a one-sequence session.
fn alone(model: &Model, gpu: &nomoat_runtime::device::Gpu, kv: KvType, n_ctx: usize, seq: &Seq) -> Trace {
    let mut s = pollster::block_on(Session::new(model, gpu, n_ctx, kv, false)).unwrap();
    let mut trace = vec![top1(&pollster::block_on(s.eval_top_k(&seq.prompt, 2)).unwrap())];
    while trace.len() < seq.n_gen {
        let next = trace.last().unwrap().0;
        trace.push(top1(&pollster::block_on(s.eval_top_k(&[next], 2)).unwrap()));
    }
    trace
}

/// The sequences decoded together: at each step, those joining are prefilled into their slot
/// (their first token), then every sequence with tokens still to generate takes one step.
fn together(model: &Model, gpu: &nomoat_runtime::device::Gpu, kv: KvType, n_ctx: usize, seqs: &[Seq]) -> Vec<Trace> {
    let mut s = pollster::block_on(Session::with_slots(model, gpu, n_ctx, kv, seqs.len())).unwrap();
    let mut traces: Vec<Trace> = vec![Vec::new(); seqs.len()];
    for step in 0.. {
        for (i, q) in seqs.iter().enumerate().filter(|(_, q)| q.joins_at == step) {
            s.select_slot(i);
            traces[i].push(top1(&pollster::block_on(s.eval_top_k(&q.prompt, 2)).unwrap()));
        }
        let steps: Vec<SlotStep> = (0..seqs.len())
            .filter(|&i| seqs[i].joins_at < step && traces[i].len() < seqs[i].n_gen)
            .map(|i| SlotStep { slot: i, token: traces[i].last().unwrap().0, want: Want::TopK(2) })
            .collect();
        if steps.is_empty() {
            if seqs.iter().all(|q| q.joins_at <= step) {
                break;
            }
            continue;
        }
        let rows = pollster::block_on(s.step_slots(&steps)).unwrap();
        for (st, row) in steps.iter().zip(rows) {
            let RowOut::Best(best) = row else { panic!("asked for the top 2") };
            traces[st.slot].push(top1(&best));
        }
    }
    traces
}

/// Compares each sequence's batched trace with its lone one; returns the failures.
fn compare(what: &str, alone: &[Trace], together: &[Trace], near_tie: f32) -> Vec<String> {
    let mut failures = Vec::new();
    for (i, (a, t)) in alone.iter().zip(together).enumerate() {
        assert_eq!(a.len(), t.len(), "{what}: sequence {i} generated {} tokens together, {} alone", t.len(), a.len());
        match a.iter().zip(t).position(|(x, y)| x.0 != y.0) {
            None => eprintln!("{what}: sequence {i}: {} greedy tokens equal", a.len()),
            Some(step) if a[step].1 < near_tie => {
                eprintln!("{what}: sequence {i}: equal for {step} steps, then a near-tie (margin {:.4})", a[step].1)
            }
            Some(step) => failures.push(format!("{what}: sequence {i}, step {step}: {} together but {} alone (margin {:.4})", t[step].0, a[step].0, a[step].1)),
        }
    }
    failures
}

fn tiny(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/tiny").join(file)
}

/// Prompts of `lens` tokens (ids below `n_vocab`), a pattern per sequence.
fn prompts(lens: &[usize], n_vocab: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = nomoat_tests::support::Rng::new(seed);
    lens.iter().map(|&n| (0..n).map(|_| ((rng.uniform() + 1.0) / 2.0 * (n_vocab - 1) as f32) as u32 + 1).collect()).collect()
}

/// Mixed lengths (one past a 64-token prefill batch), different budgets, two sequences joining
/// mid-way, on every shader variant.
fn check_tiny(file: &str, kv: KvType) {
    let mut failures = Vec::new();
    for gpu in variants() {
        let model = load(&tiny(file), gpu);
        let p = prompts(&[3, 70, 12, 1, 25], model.config.n_vocab, 7);
        let plan = [(20, 0), (14, 0), (18, 3), (9, 0), (12, 6)];
        let seqs: Vec<Seq> = p.into_iter().zip(plan).map(|(prompt, (n_gen, joins_at))| Seq { prompt, n_gen, joins_at }).collect();
        let a: Vec<Trace> = seqs.iter().map(|q| alone(&model, gpu, kv, 128, q)).collect();
        let t = together(&model, gpu, kv, 128, &seqs);
        // F32 weights: the two orders of summation differ by ~1e-6 in the logits
        failures.extend(compare(&format!("{file} {kv:?} [{:?}]", gpu.variant), &a, &t, 1e-3));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn llama_tiny_sequences_together_decode_as_alone() {
    check_tiny("llama-tiny.gguf", KvType::F32);
}

/// Per-head q/k norms and NeoX RoPE in rope_kv, an f16 cache.
#[test]
fn qwen3_tiny_sequences_together_decode_as_alone() {
    check_tiny("qwen3-tiny.gguf", KvType::F16);
}

/// Sliding-window layers, post-norms, soft-capped logits.
#[test]
fn gemma3_tiny_sequences_together_decode_as_alone() {
    check_tiny("gemma3-swa-tiny.gguf", KvType::F32);
}

/// RoPE frequency factors.
#[test]
fn llama3_tiny_sequences_together_decode_as_alone() {
    check_tiny("llama3-tiny.gguf", KvType::F16);
}

/// SmolLM2 (Q4_1, f16 cache) on the device's own variant: 8 sequences, two of them sharing a
/// prompt (the same tokens in different slots), one joining mid-way, and the full 8 rows (the
/// per-query attention kernel) as well as fewer (the key-lane and shared-head ones).
#[test]
fn smollm2_eight_sequences_together_decode_as_alone() {
    let gpu = variants().last().unwrap();
    let model = load(&model_path(SMOLLM2), gpu);
    let mut p = prompts(&[5, 40, 17, 90, 2, 33, 9], model.config.n_vocab, 11);
    p.push(p[1].clone());
    let plan = [(16, 0), (12, 0), (16, 0), (10, 0), (16, 4), (8, 0), (14, 0), (12, 2)];
    let seqs: Vec<Seq> = p.into_iter().zip(plan).map(|(prompt, (n_gen, joins_at))| Seq { prompt, n_gen, joins_at }).collect();
    let a: Vec<Trace> = seqs.iter().map(|q| alone(&model, gpu, KvType::F16, 256, q)).collect();
    let t = together(&model, gpu, KvType::F16, 256, &seqs);
    // the model tests' near-tie margin against llama.cpp
    let failures = compare("SmolLM2", &a, &t, 0.5);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The same with a q8_0 cache (`--kv q8_0`): every attention kernel reads the int8 blocks of
/// real keys and values, each sequence in its own slot; a row quantizes the same whether its
/// token came alone or with others, so the tokens agree as the f16 cache's do.
#[test]
fn smollm2_q8_0_cache_sequences_together_decode_as_alone() {
    let gpu = variants().last().unwrap();
    let model = load(&model_path(SMOLLM2), gpu);
    let mut p = prompts(&[5, 40, 17, 90, 2, 33, 9], model.config.n_vocab, 17);
    p.push(p[1].clone());
    let plan = [(16, 0), (12, 0), (16, 0), (10, 0), (16, 4), (8, 0), (14, 0), (12, 2)];
    let seqs: Vec<Seq> = p.into_iter().zip(plan).map(|(prompt, (n_gen, joins_at))| Seq { prompt, n_gen, joins_at }).collect();
    let a: Vec<Trace> = seqs.iter().map(|q| alone(&model, gpu, KvType::Q8_0, 256, q)).collect();
    let t = together(&model, gpu, KvType::Q8_0, 256, &seqs);
    let failures = compare("SmolLM2 q8_0", &a, &t, 0.5);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A q8_0 cache needs heads of a multiple of 32 (the tiny models' are 16): refused with the
/// reason and the way out, not run.
#[test]
fn q8_0_cache_refuses_heads_it_cannot_hold() {
    let gpu = variants().last().unwrap();
    let model = load(&tiny("llama-tiny.gguf"), gpu);
    let err = pollster::block_on(Session::new(&model, gpu, 64, KvType::Q8_0, false)).err().expect("a q8_0 cache of 16-wide heads").to_string();
    assert!(err.contains("q8_0") && err.contains("--kv f16"), "{err}");
    assert!(pollster::block_on(Session::new(&model, gpu, 64, KvType::F16, false)).is_ok());
}

/// Bad steps are refused with a reason, not run.
#[test]
fn bad_steps_are_refused() {
    let gpu = variants().last().unwrap();
    let model = load(&tiny("llama-tiny.gguf"), gpu);
    let mut s = pollster::block_on(Session::with_slots(&model, gpu, 8, KvType::F32, 2)).unwrap();
    let step = |slot, token| SlotStep { slot, token, want: Want::TopK(1) };
    let err = |s: &mut Session, steps: &[SlotStep]| pollster::block_on(s.step_slots(steps)).err().unwrap().to_string();
    assert!(err(&mut s, &[]).contains("sequences in one step"));
    assert!(err(&mut s, &[step(0, 1), step(0, 2)]).contains("distinct slot"));
    assert!(err(&mut s, &[step(2, 1)]).contains("distinct slot"));
    assert!(err(&mut s, &[step(0, 1), step(1, 100_000)]).contains("outside the vocabulary"));
    s.select_slot(1);
    pollster::block_on(s.eval(&[1; 8])).unwrap();
    assert!(err(&mut s, &[step(0, 1), step(1, 1)]).contains("context"));
    // nothing was fed where a step was refused
    assert_eq!(s.slot_tokens(0).len(), 0);
}

/// Gemma 3 270M (Q4_K_M: head size 256, one kv head, sliding-window layers, soft-capped
/// logits over 262,144 tokens): 4 sequences, one joining mid-way.
#[test]
fn gemma3_sequences_together_decode_as_alone() {
    let gpu = variants().last().unwrap();
    let model = load(&model_path(GEMMA3), gpu);
    let p = prompts(&[6, 70, 3, 20], model.config.n_vocab, 13);
    let plan = [(10, 0), (8, 0), (10, 3), (6, 0)];
    let seqs: Vec<Seq> = p.into_iter().zip(plan).map(|(prompt, (n_gen, joins_at))| Seq { prompt, n_gen, joins_at }).collect();
    let a: Vec<Trace> = seqs.iter().map(|q| alone(&model, gpu, KvType::F16, 256, q)).collect();
    let t = together(&model, gpu, KvType::F16, 256, &seqs);
    let failures = compare("Gemma 3", &a, &t, 0.5);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
