//! Prompt-lookup decoding (llama.cpp's lookup decoding, Saxena's "prompt lookup decoding"):
//! speculative decoding that needs no second model. The draft is what followed the most recent
//! earlier occurrence of the text's last n tokens (n from `ngram_max` down to `ngram_min`), in
//! the prompt or the reply so far; one forward pass over the last token and the draft
//! ([`crate::session::Session::eval_each`]) gives the choice after each of them, the
//! longest prefix of the draft that matches the choices is accepted together with the choice
//! after it, and the cache rows of the rest are dropped. A reply that copies from its prompt
//! (code edited in place, a document quoted) then takes several tokens a pass.
//!
//! A pass that keeps under half its draft stops drafting for 2, 4, .. 32 steps (doubling with
//! each such pass in a row): where the reply does not copy, a pass is mostly wasted work.
//!
//! Greedy decoding (penalties allowed) verifies exactly: each accepted token is the one the
//! sampler picks from that position's logits, as plain decoding picks it. Sampling at a
//! temperature takes speculative sampling's rule for a draft that proposes its tokens for
//! certain: a draft token is kept with its probability under the sampling chain, and where it
//! is not, the token is drawn from the chain's other tokens in proportion; each token then
//! comes out with the probability plain sampling gives it (the same distribution, not the same
//! draws as a run without drafts). A grammar, a logit bias and log-probabilities decode one
//! token at a time. The batched pass sums in another order than a one-token step, so at a
//! near-tie (top-2 margin of ~1e-3 or less in the logits) the two may pick differently, as
//! prefill and decode may.

use crate::sampler::Sampler;
use crate::session::{RowOut, Want, MAX_DRAFT};

/// How prompt-lookup decoding drafts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lookup {
    /// The most draft tokens a pass verifies (0: off; at most [`MAX_DRAFT`]).
    pub max_draft: usize,
    /// The longest n-gram looked up.
    pub ngram_max: usize,
    /// The shortest n-gram looked up.
    pub ngram_min: usize,
}

impl Lookup {
    /// Off: one token a step.
    pub const OFF: Lookup = Lookup { max_draft: 0, ngram_max: 3, ngram_min: 1 };

    /// Drafts of up to `max_draft` tokens (clamped to [`MAX_DRAFT`]), n-grams 3 down to 2, in
    /// greedy and sampled replies.
    pub fn with_draft(max_draft: usize) -> Lookup {
        Lookup { max_draft: max_draft.min(MAX_DRAFT), ngram_max: 3, ngram_min: 2 }
    }

    /// The default on `gpu`, for greedy and sampled replies alike (an idle run measured sampled
    /// drafting paying as greedy drafting does: bench/README.md, "Sampled replies"). CPU devices
    /// (lavapipe): drafts of 7, a pass of 8 tokens, two of prefill's four-token tiles (such a
    /// pass costs 3 to 4.5 decode steps there, 5 tokens a third tile). GPUs: 15, a pass within
    /// one 32-token tile of the tiled matmul, where decode is bound by reading the weights (not
    /// measured on a GPU yet).
    pub fn default_for(gpu: &crate::device::Gpu) -> Lookup {
        Lookup::with_draft(if gpu.tuning.cpu { 7 } else { MAX_DRAFT })
    }

    /// Whether drafting is on.
    pub fn is_on(&self) -> bool {
        self.max_draft > 0
    }

    /// The draft after `history` (prompt and reply so far): the up to `max_len` tokens that
    /// followed the most recent earlier occurrence of its last n tokens, for the longest n in
    /// `ngram_min..=ngram_max` that occurred before. Empty where none did.
    pub fn draft(&self, history: &[u32], max_len: usize) -> Vec<u32> {
        let max_len = max_len.min(self.max_draft);
        if max_len == 0 {
            return Vec::new();
        }
        let len = history.len();
        for n in (self.ngram_min.max(1)..=self.ngram_max).rev() {
            if len <= n {
                continue;
            }
            let tail = &history[len - n..];
            if let Some(i) = (0..len - n).rev().find(|&i| &history[i..i + n] == tail) {
                let start = i + n;
                return history[start..(start + max_len).min(len)].to_vec();
            }
        }
        Vec::new()
    }
}

/// How a pass's choices judge its draft: `rows[i]` is the read-back after the i-th token fed
/// (the last accepted one, then the draft's), `sampler` the generation's (it has seen every
/// token before the pass's first). Returns how many draft tokens are accepted and the token
/// chosen after them: each draft token is accepted while it is the token the sampler picks
/// there, with the penalties of the tokens before it, and the first pick that differs, or the
/// pick after the whole draft, is the next token. Greedy, that is plain decoding's token.
/// Sampling, a draft token is kept with its probability under the chain and otherwise the pick
/// is drawn from the chain's other tokens in proportion: speculative sampling's rule for a
/// draft that proposes one token for certain (accept with min(1, p/q), q = 1, else draw from
/// the rest), so every token comes out with the probability plain sampling gives it. The
/// sampler's random draws go on from the pass's.
pub fn accept(sampler: &mut Sampler, draft: &[u32], rows: &[RowOut]) -> (usize, u32) {
    assert_eq!(rows.len(), draft.len() + 1, "lookup::accept: one read-back per draft token and one after");
    let mut s = sampler.clone();
    for (i, row) in rows.iter().enumerate() {
        let pick = match row {
            RowOut::Best(best) => s.sample_top(best),
            RowOut::Logits(logits) => s.sample(logits),
        };
        match draft.get(i) {
            Some(&d) if d == pick => s.accept(d),
            _ => {
                sampler.continue_draws_from(&s);
                return (i, pick);
            }
        }
    }
    unreachable!("the last read-back always picks")
}

/// What each position of a pass over `draft` reads back: the k best logits where that is
/// enough for every position, with the penalty window as it stands there (see
/// [`Sampler::best_logits_needed`]), else every logit.
pub fn want(sampler: &Sampler, draft: &[u32], max_k: usize) -> Want {
    let mut s = sampler.clone();
    let mut k = s.best_logits_needed(max_k);
    for &d in draft {
        s.accept(d);
        k = k.zip(s.best_logits_needed(max_k)).map(|(a, b)| a.max(b));
    }
    match k {
        Some(k) => Want::TopK(k as u32),
        None => Want::Logits,
    }
}

/// Counts of a generation's drafting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LookupStats {
    /// Verification passes (each over the last token and a draft).
    pub passes: usize,
    /// Draft tokens proposed.
    pub drafted: usize,
    /// Draft tokens accepted.
    pub accepted: usize,
}

impl LookupStats {
    /// The fraction of draft tokens accepted (0 without drafts).
    pub fn acceptance(&self) -> f64 {
        self.accepted as f64 / self.drafted.max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampler::SamplerConfig;

    #[test]
    fn drafts_what_followed_the_longest_recent_ngram() {
        let l = Lookup::with_draft(4);
        // "1 2 3" occurred, followed by 4 5 6 7 8
        let h = [9, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 2, 3];
        assert_eq!(l.draft(&h, 10), vec![4, 5, 6, 7]);
        assert_eq!(l.draft(&h, 2), vec![4, 5]);
        // the most recent occurrence wins: "2 3" followed by 7, later by 5
        let h = [2, 3, 7, 2, 3, 5, 8, 2, 3];
        assert_eq!(l.draft(&h, 3), vec![5, 8, 2]);
        // a trigram beats a more recent bigram
        let h = [1, 2, 3, 4, 9, 2, 3, 6, 1, 2, 3];
        assert_eq!(l.draft(&h, 1), vec![4]);
        // nothing repeats; a draft stops at the history's end
        assert!(l.draft(&[1, 2, 3, 4], 4).is_empty());
        assert_eq!(l.draft(&[5, 6, 5, 6], 4), vec![5, 6]);
        assert!(Lookup::OFF.draft(&[5, 6, 5, 6], 4).is_empty());
    }

    fn row(best: &[u32]) -> RowOut {
        RowOut::Best(best.iter().enumerate().map(|(i, &id)| (id, 10.0 - i as f32)).collect())
    }

    #[test]
    fn accepts_the_prefix_the_choices_confirm() {
        let mut greedy = Sampler::new(SamplerConfig::greedy());
        let best = [row(&[5]), row(&[6]), row(&[7]), row(&[8])];
        assert_eq!(accept(&mut greedy, &[5, 6, 7], &best), (3, 8));
        assert_eq!(accept(&mut greedy, &[5, 6, 9], &best), (2, 7));
        assert_eq!(accept(&mut greedy, &[4, 6, 7], &best), (0, 5));
        assert_eq!(accept(&mut greedy, &[], &best[..1]), (0, 5));
    }

    /// Sampling at a temperature: over 20,000 seeds, the first token of a pass comes out with the
    /// chain's probabilities whatever the draft proposes, and so does the second where the first
    /// was the draft's; the sampler's draws go on from the pass's.
    #[test]
    fn sampled_drafts_keep_the_sampling_distribution() {
        let cfg = SamplerConfig { temperature: 0.8, top_k: 0, top_p: 0.95, min_p: 0.0, ..SamplerConfig::greedy() };
        let rows = [vec![1.0f32, 0.2, 0.9, -1.0, 0.5], vec![0.3f32, 1.2, -0.5, 0.8, 0.1], vec![0.0f32; 5]];
        let probs = |logits: &[f32]| -> Vec<f64> {
            // the chain by hand: top-p 0.95 at temperature 1 cuts the tail, then the temperature
            let mut order: Vec<usize> = (0..logits.len()).collect();
            order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
            let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
            let (mut cum, mut keep) = (0.0, Vec::new());
            for &i in &order {
                keep.push(i);
                cum += (logits[i] as f64).exp() / z;
                if cum >= 0.95 {
                    break;
                }
            }
            let w: Vec<f64> = (0..logits.len()).map(|i| if keep.contains(&i) { (logits[i] as f64 / 0.8).exp() } else { 0.0 }).collect();
            let t: f64 = w.iter().sum();
            w.iter().map(|x| x / t).collect()
        };
        let (p0, p1) = (probs(&rows[0]), probs(&rows[1]));
        assert!(p0[3] == 0.0 && p0[1] > 0.1, "{p0:?}");
        let n = 20_000;
        for draft in [[0u32, 1], [1, 3], [3, 0]] {
            let (mut first, mut second, mut kept_first) = ([0usize; 5], [0usize; 5], 0);
            for seed in 0..n {
                let mut s = Sampler::new(SamplerConfig { seed, ..cfg.clone() });
                let out = accept(&mut s, &draft, &rows.clone().map(RowOut::Logits));
                let tokens: Vec<u32> = draft[..out.0].iter().copied().chain([out.1]).collect();
                first[tokens[0] as usize] += 1;
                if tokens[0] == draft[0] {
                    kept_first += 1;
                    second[tokens[1] as usize] += 1;
                }
            }
            for t in 0..5 {
                let f = first[t] as f64 / n as f64;
                assert!((f - p0[t]).abs() < 0.015, "draft {draft:?}: token {t} first {f} against {}", p0[t]);
                if kept_first > 2000 {
                    let f = second[t] as f64 / kept_first as f64;
                    assert!((f - p1[t]).abs() < 0.035, "draft {draft:?}: token {t} second {f} against {}", p1[t]);
                }
            }
        }
        // the draws go on from the pass's: the next sample is not the one a fresh clone draws
        let mut s = Sampler::new(cfg.clone());
        let fresh = s.clone();
        let _ = accept(&mut s, &[3], &[RowOut::Logits(rows[0].clone()), RowOut::Logits(rows[1].clone())]);
        let (mut a, mut b) = (s, fresh);
        let after: Vec<u32> = (0..12).map(|_| a.sample(&rows[2])).collect();
        let before: Vec<u32> = (0..12).map(|_| b.sample(&rows[2])).collect();
        assert_ne!(after, before);
    }

    #[test]
    fn penalties_see_the_accepted_draft() {
        // 6 is repeated in the draft: at the second position the penalty on 6 puts 7 first
        let cfg = SamplerConfig { repeat_penalty: 2.0, penalty_last_n: 64, ..SamplerConfig::greedy() };
        let mut s = Sampler::new(cfg);
        let best = || RowOut::Best(vec![(6, 10.0), (7, 9.0)]);
        // after accepting 6, the next position's 6 is penalised to 5.0: 7 is picked
        assert_eq!(accept(&mut s, &[6, 6], &[best(), best(), best()]), (1, 7));
        // the same from every logit
        let logits = || RowOut::Logits(vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 9.0]);
        assert_eq!(accept(&mut s, &[6, 6], &[logits(), logits(), logits()]), (1, 7));
        assert_eq!(accept(&mut s, &[6, 7], &[logits(), logits(), logits()]), (2, 5));
        // one distinct penalised token in the window: two candidates suffice, where allowed
        assert_eq!(want(&s, &[6, 6], 128), Want::TopK(2));
        assert_eq!(want(&s, &[6, 6], 1), Want::Logits);
        assert_eq!(want(&Sampler::new(SamplerConfig::greedy()), &[6, 6], 1), Want::TopK(1));
    }
}
