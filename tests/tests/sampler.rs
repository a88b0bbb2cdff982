//! The CPU sampler: llama.cpp's chain (penalties → top-k → top-p → min-p → temperature → draw).

use nomoat_runtime::sampler::{Sampler, SamplerConfig};
use nomoat_tests::support::Rng;

fn cfg(temperature: f32, top_k: usize, top_p: f32, min_p: f32) -> SamplerConfig {
    SamplerConfig { temperature, top_k, top_p, min_p, ..SamplerConfig::default() }
}

fn counts(s: &mut Sampler, logits: &[f32], draws: usize) -> Vec<usize> {
    let mut c = vec![0; logits.len()];
    for _ in 0..draws {
        c[s.sample(logits) as usize] += 1;
    }
    c
}

fn softmax(xs: &[f32], t: f64) -> Vec<f64> {
    let m = xs.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let e: Vec<f64> = xs.iter().map(|&x| ((x as f64 - m) / t).exp()).collect();
    let z: f64 = e.iter().sum();
    e.iter().map(|v| v / z).collect()
}

#[test]
fn greedy_is_argmax() {
    let mut rng = Rng::new(1);
    let mut s = Sampler::new(SamplerConfig::greedy());
    for _ in 0..50 {
        let logits = rng.fill(1000, 5.0);
        let want = logits.iter().enumerate().fold(0, |b, (i, &x)| if x > logits[b] { i } else { b });
        assert_eq!(s.sample(&logits), want as u32);
    }
    // Lowest id on ties, NaN ignored.
    assert_eq!(s.sample(&[1.0, 3.0, f32::NAN, 3.0]), 1);
    assert_eq!(s.sample(&[f32::NAN, -1.0]), 1);
    assert_eq!(s.sample(&[f32::NEG_INFINITY; 3]), 0);
    // temperature 0 is greedy even with the default filters.
    let mut s = Sampler::new(SamplerConfig { temperature: 0.0, ..Default::default() });
    assert_eq!(s.sample(&[0.0, 2.0, 1.9]), 1);
}

#[test]
fn top_k_1_is_greedy_at_any_temperature() {
    let mut rng = Rng::new(2);
    for &t in &[0.1f32, 0.8, 1.0, 2.0, 100.0] {
        let mut s = Sampler::new(SamplerConfig { temperature: t, top_k: 1, top_p: 1.0, min_p: 0.0, ..Default::default() });
        let mut g = Sampler::new(SamplerConfig::greedy());
        for _ in 0..20 {
            let logits = rng.fill(500, 3.0);
            assert_eq!(s.sample(&logits), g.sample(&logits), "temperature {t}");
        }
    }
}

#[test]
fn same_seed_same_tokens() {
    let mut rng = Rng::new(3);
    let rows: Vec<Vec<f32>> = (0..100).map(|_| rng.fill(300, 4.0)).collect();
    let c = SamplerConfig { temperature: 1.0, seed: 1234, repeat_penalty: 1.1, ..Default::default() };
    let run = |cfg: &SamplerConfig| -> Vec<u32> {
        let mut s = Sampler::new(cfg.clone());
        rows.iter()
            .map(|r| {
                let id = s.sample(r);
                s.accept(id);
                id
            })
            .collect()
    };
    let a = run(&c);
    assert_eq!(a, run(&c));
    let distinct = {
        let mut v = a.clone();
        v.sort();
        v.dedup();
        v.len()
    };
    assert!(distinct > 10, "draws look stuck: {a:?}");
    // Another seed differs; reset() replays the same draws.
    assert_ne!(a, run(&SamplerConfig { seed: 1235, ..c.clone() }));
    let mut s = Sampler::new(c.clone());
    let first: Vec<u32> = rows
        .iter()
        .take(10)
        .map(|r| {
            let id = s.sample(r);
            s.accept(id);
            id
        })
        .collect();
    s.reset();
    let again: Vec<u32> = rows
        .iter()
        .take(10)
        .map(|r| {
            let id = s.sample(r);
            s.accept(id);
            id
        })
        .collect();
    assert_eq!(first, again);
    assert_eq!(first[..], a[..10]);
}

#[test]
fn empirical_distribution_matches_softmax() {
    let logits = [1.0f32, 2.0, 0.5, -1.0];
    for &t in &[1.0f32, 0.7] {
        let want = softmax(&logits, t as f64);
        let mut s = Sampler::new(SamplerConfig { temperature: t, top_k: 0, top_p: 1.0, min_p: 0.0, seed: 7, ..Default::default() });
        let n = 20000;
        let c = counts(&mut s, &logits, n);
        for i in 0..4 {
            let got = c[i] as f64 / n as f64;
            assert!((got - want[i]).abs() < 0.015, "t {t} token {i}: {got} vs {}", want[i]);
        }
    }
}

#[test]
fn top_k_keeps_k_most_likely() {
    let logits = [3.0f32, 2.9, 2.8, 0.0, 2.95];
    let mut s = Sampler::new(SamplerConfig { temperature: 1.0, top_k: 2, top_p: 1.0, min_p: 0.0, ..Default::default() });
    let c = counts(&mut s, &logits, 5000);
    assert_eq!((c[1], c[2], c[3]), (0, 0, 0), "{c:?}");
    assert!(c[0] > 1500 && c[4] > 1500, "{c:?}");
}

#[test]
fn top_p_excludes_the_tail() {
    // p = [0.6439, 0.2369, 0.0871, 0.0321]: top_p 0.8 keeps the first two (0.881 ≥ 0.8).
    let logits = [3.0f32, 2.0, 1.0, 0.0];
    let mut s = Sampler::new(cfg(1.0, 0, 0.8, 0.0));
    let c = counts(&mut s, &logits, 5000);
    assert_eq!((c[2], c[3]), (0, 0), "{c:?}");
    assert!(c[1] > 1000, "{c:?}");
    // top_p just below the first probability keeps one token.
    let mut s = Sampler::new(cfg(1.0, 0, 0.6, 0.0));
    assert!(counts(&mut s, &logits, 500).iter().skip(1).all(|&n| n == 0));
    // Top-p uses temperature-1 probabilities even when the temperature is high.
    let mut s = Sampler::new(cfg(5.0, 0, 0.8, 0.0));
    let c = counts(&mut s, &logits, 5000);
    assert_eq!((c[2], c[3]), (0, 0), "{c:?}");
}

#[test]
fn min_p_excludes_the_tail() {
    // Relative to the top token: 1, 0.368, 0.135, 0.0498. min_p 0.1 keeps three.
    let logits = [3.0f32, 2.0, 1.0, 0.0];
    let mut s = Sampler::new(cfg(1.0, 0, 1.0, 0.1));
    let c = counts(&mut s, &logits, 5000);
    assert_eq!(c[3], 0, "{c:?}");
    assert!(c[2] > 200, "{c:?}");
    let mut s = Sampler::new(cfg(1.5, 0, 1.0, 0.2));
    let c = counts(&mut s, &logits, 5000);
    assert_eq!((c[2], c[3]), (0, 0), "{c:?}");
    // Combined with top-p, the smaller set wins.
    let mut s = Sampler::new(cfg(1.0, 0, 0.95, 0.3));
    let c = counts(&mut s, &logits, 5000);
    assert_eq!((c[2], c[3]), (0, 0), "{c:?}");
}

#[test]
fn large_vocab_defaults_stay_in_top_k() {
    let mut rng = Rng::new(9);
    let logits = rng.fill(50_000, 6.0);
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].partial_cmp(&logits[a]).unwrap());
    let top40: std::collections::BTreeSet<u32> = order[..40].iter().map(|&i| i as u32).collect();
    let mut s = Sampler::new(SamplerConfig::default());
    for _ in 0..200 {
        assert!(top40.contains(&s.sample(&logits)));
    }
}

#[test]
fn repeat_penalty_changes_the_argmax() {
    let logits = [2.0f32, 1.8, -1.0, -1.1];
    let mut s = Sampler::new(SamplerConfig { repeat_penalty: 1.2, ..SamplerConfig::greedy() });
    assert_eq!(s.sample(&logits), 0);
    s.accept(0); // 2.0 / 1.2 = 1.667 < 1.8
    assert_eq!(s.sample(&logits), 1);
    // Negative logits are multiplied: -1.0 * 1.2 = -1.2 < -1.1.
    let neg = [-1.0f32, -1.1];
    let mut s = Sampler::new(SamplerConfig { repeat_penalty: 1.2, ..SamplerConfig::greedy() });
    s.accept(0);
    assert_eq!(s.sample(&neg), 1);
    // Dividing a negative logit would have raised it instead; make sure we did not.
    let mut s = Sampler::new(SamplerConfig { repeat_penalty: 1.2, ..SamplerConfig::greedy() });
    s.accept(1);
    assert_eq!(s.sample(&neg), 0);
}

#[test]
fn frequency_and_presence_penalties() {
    let logits = [2.0f32, 1.5, 0.0];
    // Frequency: 2.0 - 2 * 0.3 = 1.4 < 1.5.
    let mut s = Sampler::new(SamplerConfig { frequency_penalty: 0.3, ..SamplerConfig::greedy() });
    s.accept(0);
    assert_eq!(s.sample(&logits), 0); // 1.7 > 1.5
    s.accept(0);
    assert_eq!(s.sample(&logits), 1);
    // Presence: counted once however often the token appeared.
    let mut s = Sampler::new(SamplerConfig { presence_penalty: 0.4, ..SamplerConfig::greedy() });
    for _ in 0..5 {
        s.accept(1);
    }
    assert_eq!(s.sample(&logits), 0);
    s.accept(0); // 2.0 - 0.4 = 1.6 > 1.1
    assert_eq!(s.sample(&logits), 0);
    let mut s = Sampler::new(SamplerConfig { presence_penalty: 0.6, ..SamplerConfig::greedy() });
    s.accept(0); // 1.4 < 1.5
    assert_eq!(s.sample(&logits), 1);
}

#[test]
fn penalty_window_is_last_n() {
    let logits = [2.0f32, 1.8];
    let mut s = Sampler::new(SamplerConfig { repeat_penalty: 1.5, penalty_last_n: 3, ..SamplerConfig::greedy() });
    s.accept(0);
    assert_eq!(s.sample(&logits), 1);
    for _ in 0..3 {
        s.accept(7); // out of vocabulary: ignored by the penalty, but it fills the window
    }
    assert_eq!(s.history().collect::<Vec<_>>(), [7, 7, 7]);
    assert_eq!(s.sample(&logits), 0);
    s.accept(0);
    s.reset();
    assert_eq!(s.history().count(), 0);
    assert_eq!(s.sample(&logits), 0);
    // penalty_last_n = 0 turns penalties off.
    let mut s = Sampler::new(SamplerConfig { repeat_penalty: 1.5, penalty_last_n: 0, ..SamplerConfig::greedy() });
    s.accept(0);
    assert_eq!(s.sample(&logits), 0);
}

#[test]
fn penalties_apply_before_filters() {
    // Token 0 dominates; after the penalty, top_k 1 must pick token 1.
    let logits = [5.0f32, 4.0, 0.0];
    let mut s = Sampler::new(SamplerConfig { temperature: 1.0, top_k: 1, repeat_penalty: 2.0, ..Default::default() });
    s.accept(0);
    assert_eq!(s.sample(&logits), 1);
}

#[test]
fn best_logits_needed() {
    let needed = |c: SamplerConfig| c.best_logits_needed(128);
    assert_eq!(needed(SamplerConfig::greedy()), Some(1));
    assert_eq!(needed(SamplerConfig::default()), Some(40));
    assert_eq!(needed(SamplerConfig { top_k: 1, ..SamplerConfig::default() }), Some(1));
    // every logit: top-k off or above the GPU's limit, or a penalty in play
    assert_eq!(needed(SamplerConfig { top_k: 0, ..SamplerConfig::default() }), None);
    assert_eq!(needed(SamplerConfig { top_k: 129, ..SamplerConfig::default() }), None);
    assert_eq!(needed(SamplerConfig { repeat_penalty: 1.1, ..SamplerConfig::greedy() }), None);
    assert_eq!(needed(SamplerConfig { presence_penalty: 0.5, ..SamplerConfig::default() }), None);
    // a penalty over an empty window changes nothing
    assert_eq!(needed(SamplerConfig { repeat_penalty: 1.1, penalty_last_n: 0, ..SamplerConfig::greedy() }), Some(1));
}

/// Sampling from the k best (id, logit) pairs, as the GPU's top-k hands them over, picks the
/// same tokens as sampling from the whole row, draw for draw.
#[test]
fn sample_top_matches_sample() {
    let configs = [SamplerConfig::default(), SamplerConfig::greedy(), cfg(1.5, 5, 1.0, 0.0), cfg(0.7, 128, 0.9, 0.0), cfg(1.0, 40, 0.5, 0.2), cfg(2.0, 64, 1.0, 0.01)];
    let mut rng = Rng::new(9);
    for c in configs {
        let k = c.best_logits_needed(128).unwrap();
        let mut whole = Sampler::new(c.clone());
        let mut best = Sampler::new(c.clone());
        for round in 0..200 {
            // rounded logits tie often, so the lower-id-first order is exercised
            let mut logits: Vec<f32> = rng.fill(1000, 4.0).iter().map(|v| (v * 4.0).round() / 4.0).collect();
            if round % 10 == 0 {
                logits[7] = f32::NEG_INFINITY;
            }
            let top: Vec<(u32, f32)> = nomoat_runtime::reference::top_k(&logits, k).into_iter().map(|(i, v)| (i as u32, v)).collect();
            assert_eq!(whole.sample(&logits), best.sample_top(&top), "{c:?}, round {round}");
        }
    }
}

#[test]
fn validate_errors() {
    assert!(SamplerConfig::default().validate().is_ok());
    assert!(SamplerConfig::greedy().validate().is_ok());
    let bad = |c: SamplerConfig, word: &str| {
        let e = c.validate().expect_err(word);
        assert!(e.contains(word), "{e}");
    };
    let d = SamplerConfig::default;
    bad(SamplerConfig { temperature: -0.1, ..d() }, "temperature");
    bad(SamplerConfig { temperature: f32::NAN, ..d() }, "temperature");
    bad(SamplerConfig { temperature: f32::INFINITY, ..d() }, "temperature");
    bad(SamplerConfig { top_p: 0.0, ..d() }, "top_p");
    bad(SamplerConfig { top_p: 1.5, ..d() }, "top_p");
    bad(SamplerConfig { top_p: f32::NAN, ..d() }, "top_p");
    bad(SamplerConfig { min_p: -0.1, ..d() }, "min_p");
    bad(SamplerConfig { min_p: 1.1, ..d() }, "min_p");
    bad(SamplerConfig { min_p: f32::NAN, ..d() }, "min_p");
    bad(SamplerConfig { repeat_penalty: 0.0, ..d() }, "repeat_penalty");
    bad(SamplerConfig { repeat_penalty: f32::NAN, ..d() }, "repeat_penalty");
    bad(SamplerConfig { frequency_penalty: f32::NAN, ..d() }, "frequency_penalty");
    bad(SamplerConfig { presence_penalty: f32::INFINITY, ..d() }, "presence_penalty");
    assert!(SamplerConfig { top_p: 1.0, min_p: 1.0, temperature: 0.0, ..d() }.validate().is_ok());
}
