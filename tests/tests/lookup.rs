//! Prompt-lookup decoding (runtime/src/lookup.rs) gives the tokens of plain greedy decoding:
//! drafts copied from the prompt, checked by one batched pass, the rejected rows of the KV
//! cache dropped. On a code-editing prompt (most drafts accepted), on prose whose repeated
//! words draft continuations the model does not take (most rejected), with a repetition
//! penalty (the verifier must apply it to each draft position with the tokens before it), and
//! a deliberately wrong draft through the verifier on its own. Sampled decoding takes drafts
//! too, with the same seed giving the same reply.
//!
//! Near-ties: the batched pass sums in another order than a one-token step, so the two may
//! differ only where plain decoding's top-2 margin is under `NEAR_TIE`; there the histories may
//! legitimately part and the comparison stops (as tests/batch_decode.rs does).

use nomoat_runtime::generate::{GenerateOptions, Generation};
use nomoat_runtime::gguf::Gguf;
use nomoat_runtime::lookup::{self, Lookup};
use nomoat_runtime::model::Model;
use nomoat_runtime::ops::KvType;
use nomoat_runtime::sampler::{Sampler, SamplerConfig};
use nomoat_runtime::session::{RowOut, Session, Want};
use nomoat_runtime::tokenizer::Tokenizer;
use nomoat_tests::gpu::variants;
use nomoat_tests::support::{model_path, SMOLLM2};

/// Logit margin under which plain decoding's choice is a near-tie (Q4_1 weights: the two
/// summation orders differ by ~1e-3 in the logits).
const NEAR_TIE: f32 = 0.05;

const FUNCTION: &str = r#"def summarize_orders(orders, tax_rate=0.08):
    summary = {}
    for order in orders:
        customer = order.get("customer", "unknown")
        subtotal = 0.0
        for item in order.get("items", []):
            price = float(item.get("price", 0))
            quantity = int(item.get("quantity", 1))
            subtotal += price * quantity
        tax = subtotal * tax_rate
        entry = summary.setdefault(customer, {"orders": 0, "total": 0.0})
        entry["orders"] += 1
        entry["total"] += subtotal + tax
    return summary
"#;

fn code_edit_prompt() -> String {
    format!(
        "<|im_start|>user\nRename the function below to summarize_sales and change nothing else. Output only the code.\n\n```python\n{FUNCTION}```<|im_end|>\n<|im_start|>assistant\n```python\n"
    )
}

const PROSE: &str =
    "<|im_start|>user\nThe cat sat on the mat. The dog sat on the rug. The bird sat on the branch. Write a short poem about the sea.<|im_end|>\n<|im_start|>assistant\n";

struct Loaded {
    model: Model,
    tok: Tokenizer,
}

fn load(gpu: &'static nomoat_runtime::device::Gpu) -> Loaded {
    let path = model_path(SMOLLM2);
    let mut f = std::fs::File::open(&path).unwrap();
    let len = f.metadata().unwrap().len();
    let gguf = Gguf::read_from(&mut f, len).unwrap();
    let tok = Tokenizer::from_gguf(&gguf).unwrap();
    let model = pollster::block_on(Model::load(&gguf, gpu, &mut f, &mut |_, _| {})).unwrap();
    Loaded { model, tok }
}

fn generate(l: &Loaded, gpu: &nomoat_runtime::device::Gpu, lookup: Lookup, prompt: &[u32], sampler: &SamplerConfig, n: usize) -> Generation {
    let mut s = pollster::block_on(Session::new(&l.model, gpu, 1024, KvType::F16, false)).unwrap();
    s.lookup = lookup;
    let opts = GenerateOptions { max_tokens: n, sampler: sampler.clone(), ..GenerateOptions::default() };
    pollster::block_on(s.generate(&l.tok, prompt, &opts, &mut |_| true)).unwrap()
}

/// Plain greedy decoding's top-2 margin at each of `tokens` (fed one at a time after `prompt`).
fn margins(l: &Loaded, gpu: &nomoat_runtime::device::Gpu, prompt: &[u32], tokens: &[u32]) -> Vec<f32> {
    let mut s = pollster::block_on(Session::new(&l.model, gpu, 1024, KvType::F16, false)).unwrap();
    let margin = |b: &[(u32, f32)]| b[0].1 - b[1].1;
    let mut out = vec![margin(&pollster::block_on(s.eval_top_k(prompt, 2)).unwrap())];
    for &t in &tokens[..tokens.len().saturating_sub(1)] {
        out.push(margin(&pollster::block_on(s.eval_top_k(&[t], 2)).unwrap()));
    }
    out
}

/// Whether lookup's tokens equal plain decoding's, up to a near-tie; a description either way.
fn same(l: &Loaded, gpu: &nomoat_runtime::device::Gpu, prompt: &[u32], plain: &Generation, fast: &Generation) -> Result<String, String> {
    let Some(step) = plain.tokens.iter().zip(&fast.tokens).position(|(a, b)| a != b) else {
        if plain.tokens.len() != fast.tokens.len() {
            return Err(format!("{} tokens plain, {} with lookup", plain.tokens.len(), fast.tokens.len()));
        }
        return Ok(format!("{} tokens equal", plain.tokens.len()));
    };
    let m = margins(l, gpu, prompt, &plain.tokens[..=step]);
    if m[step] < NEAR_TIE {
        return Ok(format!("equal for {step} tokens, then a near-tie (margin {:.4})", m[step]));
    }
    Err(format!("token {step}: {} with lookup, {} plain (margin {:.4})", fast.tokens[step], plain.tokens[step], m[step]))
}

#[test]
fn lookup_decodes_as_plain_greedy() {
    let mut failures = Vec::new();
    // the default kernels (the test takes a minute a variant on lavapipe; batch_decode and the
    // conformance suite cover the batched kernels on every variant)
    for gpu in &variants()[variants().len() - 1..] {
        let l = load(gpu);
        let greedy = SamplerConfig::greedy();
        let penalised = SamplerConfig { repeat_penalty: 1.1, penalty_last_n: 64, ..SamplerConfig::greedy() };
        let code = l.tok.encode(&code_edit_prompt(), false, true).unwrap();
        let prose = l.tok.encode(PROSE, false, true).unwrap();
        for (what, prompt, sampler, n) in [("code edit", &code, &greedy, 100), ("prose", &prose, &greedy, 40), ("code edit, repeat penalty", &code, &penalised, 40)] {
            let plain = generate(&l, gpu, Lookup::OFF, prompt, sampler, n);
            let fast = generate(&l, gpu, Lookup::with_draft(8), prompt, sampler, n);
            let st = fast.lookup;
            assert_eq!(plain.lookup.passes, 0);
            eprintln!("[{:?}] {what}: {} of {} drafted tokens accepted in {} passes: {:?}", gpu.variant, st.accepted, st.drafted, st.passes, fast.text);
            match same(&l, gpu, prompt, &plain, &fast) {
                Ok(note) => eprintln!("[{:?}] {what}: {note}", gpu.variant),
                Err(e) => failures.push(format!("[{:?}] {what}: {e}\nplain: {:?}\nlookup: {:?}", gpu.variant, plain.text, fast.text)),
            }
            // the cases do what they are meant to: the code is mostly copied, the prose's
            // drafts mostly wrong
            if what == "code edit" {
                assert!(st.accepted >= 40 && st.acceptance() > 0.4, "{what}: {st:?}");
            }
            if what == "code edit, repeat penalty" {
                // drafts kept under the penalty: the verifier applied it per position
                assert!(st.accepted >= 4, "{what}: {st:?}");
            }
            if what == "prose" {
                assert!(st.passes >= 2 && st.acceptance() < 0.5, "{what}: {st:?}");
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Sampling at a temperature takes drafts too (lookup::accept keeps a draft token where the
/// sampler draws it, so tokens come out as plain sampling gives them: the distribution is
/// checked in runtime/src/lookup.rs's unit tests): on the code edit most of the function is
/// copied in passes, and the same seed gives the same reply.
#[test]
fn sampled_decoding_takes_drafts() {
    let gpu = &variants()[variants().len() - 1];
    let l = load(gpu);
    let code = l.tok.encode(&code_edit_prompt(), false, true).unwrap();
    let sampler = SamplerConfig { temperature: 0.7, top_k: 20, top_p: 0.8, seed: 7, ..SamplerConfig::default() };
    let a = generate(&l, gpu, Lookup::with_draft(8), &code, &sampler, 60);
    let b = generate(&l, gpu, Lookup::with_draft(8), &code, &sampler, 60);
    eprintln!("sampled: {:?} {:?}", a.lookup, a.text);
    assert_eq!(a.tokens, b.tokens, "the same seed");
    assert!(a.lookup.passes >= 2 && a.lookup.accepted >= 10, "{:?}", a.lookup);
    assert!(a.text.contains("for order in orders"), "{:?}", a.text);
}

/// A draft that is right for three tokens then wrong: the verifier keeps the three, picks plain
/// decoding's fourth, and the cache cut back to them continues as plain decoding does. A
/// verifier that read the wrong rows, or a cache not cut back, fails this.
#[test]
fn a_wrong_draft_is_cut_where_it_goes_wrong() {
    let gpu = &variants()[variants().len() - 1];
    let l = load(gpu);
    let prompt = l.tok.encode(&code_edit_prompt(), false, true).unwrap();
    let plain = generate(&l, gpu, Lookup::OFF, &prompt, &SamplerConfig::greedy(), 12).tokens;
    let mut greedy = Sampler::new(SamplerConfig::greedy());
    let mut s = pollster::block_on(Session::new(&l.model, gpu, 1024, KvType::F16, false)).unwrap();
    let first = pollster::block_on(s.eval_top_k(&prompt, 1)).unwrap()[0].0;
    assert_eq!(first, plain[0]);
    let wrong = (plain[4] + 1) % l.model.config.n_vocab as u32;
    let draft = [plain[1], plain[2], plain[3], wrong, plain[5]];
    for want in [Want::TopK(1), Want::TopK(4), Want::Logits] {
        let base = s.tokens.len();
        let rows = pollster::block_on(s.eval_each(&[&[first][..], &draft].concat(), want)).unwrap();
        assert_eq!(rows.len(), 6);
        assert_eq!(s.tokens.len(), base + 6);
        if let (Want::TopK(k), RowOut::Best(b)) = (want, &rows[0]) {
            assert_eq!(b.len(), k as usize);
        }
        assert_eq!(lookup::accept(&mut greedy, &draft, &rows), (3, plain[4]), "{want:?}");
        // a draft wrong at its first token keeps nothing
        assert_eq!(lookup::accept(&mut greedy, &[wrong], &rows[..2]), (0, plain[1]), "{want:?}");
        s.truncate(base + 1 + 3);
        // plain decoding from the cut cache
        let mut next = plain[4];
        for &expect in &plain[5..] {
            next = pollster::block_on(s.eval_top_k(&[next], 1)).unwrap()[0].0;
            assert_eq!(next, expect, "{want:?}: decoding after the cut");
        }
        s.truncate(base);
    }
}
