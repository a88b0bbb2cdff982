//! CPU token sampler over a logits slice, following llama.cpp's default sampler chain:
//!
//! penalties → top-k → top-p → min-p → temperature → softmax → draw.
//!
//! - **Penalties** (llama.cpp's `penalties` sampler) look at the last `penalty_last_n` accepted
//!   tokens (see [`Sampler::accept`]). For each token seen there `count` times: a positive logit
//!   is divided by `repeat_penalty`, a negative one multiplied by it; then
//!   `logit -= count * frequency_penalty + presence_penalty`.
//! - **Top-k** keeps the `top_k` highest logits (0 = off).
//! - **Top-p** keeps the shortest prefix of the candidates (sorted by probability at
//!   temperature 1, as llama.cpp does) whose cumulative probability reaches `top_p` (1 = off).
//! - **Min-p** keeps candidates whose probability is at least `min_p` times the highest one
//!   (0 = off).
//! - **Temperature** divides the logits; then a softmax and a draw from the seeded RNG.
//!
//! `temperature == 0` (or `top_k == 1`) is greedy: the argmax after penalties, the lowest id on
//! ties. NaN logits count as `-inf`.
//!
//! Determinism: the same seed and the same sequence of logits (and accepted tokens) give the
//! same tokens, on native and wasm alike: the RNG is our own xoshiro256**, ordering never depends
//! on hash-map iteration, ties are broken by the lower token id, and the softmax uses an `exp`
//! written here from IEEE basic operations only (the platform `exp` may differ by an ulp
//! between native libm and wasm).

use std::cmp::Ordering;
use std::collections::VecDeque;

/// Sampling parameters, named and defaulted as in llama.cpp.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplerConfig {
    /// 0 = greedy (argmax after penalties).
    pub temperature: f32,
    /// 0 = off.
    pub top_k: usize,
    /// 1 = off. Must lie in (0, 1].
    pub top_p: f32,
    /// 0 = off. Must lie in [0, 1].
    pub min_p: f32,
    /// 1 = off. Must be > 0.
    pub repeat_penalty: f32,
    /// 0 = off.
    pub frequency_penalty: f32,
    /// 0 = off.
    pub presence_penalty: f32,
    /// How many of the most recently accepted tokens the penalties look at (0 = penalties off).
    pub penalty_last_n: usize,
    /// RNG seed. The default is the fixed [`SamplerConfig::DEFAULT_SEED`], so two runs with
    /// default settings draw the same tokens; set it (e.g. from a clock) for varied output.
    pub seed: u64,
}

impl SamplerConfig {
    /// The seed [`Default`] uses (a fixed value, unlike llama.cpp's random default).
    pub const DEFAULT_SEED: u64 = 0x6E6F_6D6F_6174; // "nomoat"

    /// Plain argmax, no penalties: the GPU argmax is enough (see [`Self::best_logits_needed`]).
    pub fn greedy() -> Self {
        SamplerConfig { temperature: 0.0, top_k: 0, top_p: 1.0, min_p: 0.0, ..Default::default() }
    }

    /// Checks every field; the message names the field and the allowed range.
    pub fn validate(&self) -> Result<(), String> {
        let t = self.temperature;
        if t.is_nan() || t < 0.0 || t.is_infinite() {
            return Err(format!("temperature must be a finite number >= 0 (0 = greedy), got {t}"));
        }
        let p = self.top_p;
        if p.is_nan() || p <= 0.0 || p > 1.0 {
            return Err(format!("top_p must lie in (0, 1] (1 = off), got {p}"));
        }
        let m = self.min_p;
        if m.is_nan() || !(0.0..=1.0).contains(&m) {
            return Err(format!("min_p must lie in [0, 1] (0 = off), got {m}"));
        }
        let r = self.repeat_penalty;
        if r.is_nan() || r <= 0.0 || r.is_infinite() {
            return Err(format!("repeat_penalty must be a finite number > 0 (1 = off), got {r}"));
        }
        if !self.frequency_penalty.is_finite() {
            return Err(format!("frequency_penalty must be finite (0 = off), got {}", self.frequency_penalty));
        }
        if !self.presence_penalty.is_finite() {
            return Err(format!("presence_penalty must be finite (0 = off), got {}", self.presence_penalty));
        }
        Ok(())
    }

    /// Whether any penalty can change a logit.
    pub fn has_penalties(&self) -> bool {
        self.penalty_last_n > 0 && (self.repeat_penalty != 1.0 || self.frequency_penalty != 0.0 || self.presence_penalty != 0.0)
    }

    /// Whether the choice is just the argmax of the raw logits (temperature 0 or top-k 1).
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0 || self.top_k == 1
    }

    /// How many of the best logits the choice depends on, where that is at most `max_k` and no
    /// penalty changes them: 1 when greedy, top_k when sampling from the top k. The GPU's top-k
    /// (highest first, the lower id first on ties) then gives [`Sampler::sample_top`] all it
    /// needs and the logits need not be read back. None: the choice needs every logit.
    pub fn best_logits_needed(&self, max_k: usize) -> Option<usize> {
        if self.has_penalties() {
            None
        } else if self.is_greedy() {
            Some(1)
        } else {
            Some(self.top_k).filter(|&k| k > 0 && k <= max_k)
        }
    }
}

impl Default for SamplerConfig {
    /// llama.cpp's defaults: temperature 0.8, top-k 40, top-p 0.95, min-p 0.05, penalties off
    /// (last_n 64), seed [`SamplerConfig::DEFAULT_SEED`].
    fn default() -> Self {
        SamplerConfig {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            penalty_last_n: 64,
            seed: Self::DEFAULT_SEED,
        }
    }
}

/// Sampling values that replace a config's where they are set ([`Self::over`]): a user's flags
/// or request fields, or a model's own recommendation ([`Self::from_gguf`]), the
/// `general.sampling.*` keys that llama.cpp's converter copies from the checkpoint's
/// `generation_config.json`. llama.cpp uses those in place of its defaults unless the user sets
/// the value, and so do we: the author knows best which temperature keeps their model coherent
/// (a 1B model at 0.8 may ramble where 0.2 answers).
///
/// Keys read: `temp`, `top_k`, `top_p`, `min_p`, `penalty_repeat`, `penalty_last_n`. The others
/// llama.cpp defines (`sequence`, `xtc_*`, `mirostat*`) name samplers we do not have and are
/// ignored. A value of the wrong type or out of range is skipped with a note in `ignored`,
/// never a failed load: a bad hint must not make a good model unusable.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SamplingOverrides {
    /// `temp`.
    pub temperature: Option<f32>,
    /// `top_k` (0: off).
    pub top_k: Option<usize>,
    /// `top_p`.
    pub top_p: Option<f32>,
    /// `min_p`.
    pub min_p: Option<f32>,
    /// `penalty_repeat`.
    pub repeat_penalty: Option<f32>,
    /// `penalty_last_n`: how many recent tokens the penalties look at.
    pub penalty_last_n: Option<usize>,
    /// One line per skipped key, saying why.
    pub ignored: Vec<String>,
}

impl SamplingOverrides {
    /// A model's own values, from its `general.sampling.*` keys.
    pub fn from_gguf(gguf: &crate::gguf::Gguf) -> SamplingOverrides {
        let mut ignored = Vec::new();
        let mut number = |key: &str, ok: &dyn Fn(f64) -> bool, range: &str| -> Option<f64> {
            let full = format!("general.sampling.{key}");
            let v = gguf.get(&full)?;
            // the converter writes floats as F32 and counts as I32; accept either for either
            match v.as_f64().or_else(|| v.as_i128().map(|x| x as f64)) {
                Some(x) if x.is_finite() && ok(x) => Some(x),
                Some(x) => {
                    ignored.push(format!("{full} = {x} ignored: must be {range}"));
                    None
                }
                None => {
                    ignored.push(format!("{full} ignored: a number was expected, got {}", v.type_name()));
                    None
                }
            }
        };
        let temperature = number("temp", &|x| x >= 0.0, ">= 0");
        let top_k = number("top_k", &|x| x >= 0.0 && x.fract() == 0.0, "a whole number >= 0");
        let top_p = number("top_p", &|x| x > 0.0 && x <= 1.0, "in (0, 1]");
        let min_p = number("min_p", &|x| (0.0..=1.0).contains(&x), "in [0, 1]");
        let repeat_penalty = number("penalty_repeat", &|x| x > 0.0, "> 0");
        let penalty_last_n = number("penalty_last_n", &|x| x >= 0.0 && x.fract() == 0.0, "a whole number >= 0");
        SamplingOverrides {
            temperature: temperature.map(|x| x as f32),
            top_k: top_k.map(|x| x as usize),
            top_p: top_p.map(|x| x as f32),
            min_p: min_p.map(|x| x as f32),
            repeat_penalty: repeat_penalty.map(|x| x as f32),
            penalty_last_n: penalty_last_n.map(|x| x as usize),
            ignored,
        }
    }

    /// These values, and `fallback`'s where these are not set (a model file's own values over
    /// its catalog entry's recommendation).
    pub fn or(&self, fallback: &SamplingOverrides) -> SamplingOverrides {
        SamplingOverrides {
            temperature: self.temperature.or(fallback.temperature),
            top_k: self.top_k.or(fallback.top_k),
            top_p: self.top_p.or(fallback.top_p),
            min_p: self.min_p.or(fallback.min_p),
            repeat_penalty: self.repeat_penalty.or(fallback.repeat_penalty),
            penalty_last_n: self.penalty_last_n.or(fallback.penalty_last_n),
            ignored: self.ignored.iter().chain(&fallback.ignored).cloned().collect(),
        }
    }

    /// `base` with the values set here in place of its own.
    pub fn over(&self, base: &SamplerConfig) -> SamplerConfig {
        SamplerConfig {
            temperature: self.temperature.unwrap_or(base.temperature),
            top_k: self.top_k.unwrap_or(base.top_k),
            top_p: self.top_p.unwrap_or(base.top_p),
            min_p: self.min_p.unwrap_or(base.min_p),
            repeat_penalty: self.repeat_penalty.unwrap_or(base.repeat_penalty),
            penalty_last_n: self.penalty_last_n.unwrap_or(base.penalty_last_n),
            ..base.clone()
        }
    }

    /// llama.cpp's defaults with these values laid over them: for a model's own, what a request
    /// or a command line that sets nothing gets.
    pub fn defaults(&self) -> SamplerConfig {
        self.over(&SamplerConfig::default())
    }

    /// "temp 0.2, top_p 0.9": the values set here, for a status line; None when none is.
    pub fn describe(&self) -> Option<String> {
        let mut parts = Vec::new();
        let mut put = |name: &str, v: Option<String>| {
            if let Some(v) = v {
                parts.push(format!("{name} {v}"));
            }
        };
        put("temp", self.temperature.map(|x| x.to_string()));
        put("top_k", self.top_k.map(|x| x.to_string()));
        put("top_p", self.top_p.map(|x| x.to_string()));
        put("min_p", self.min_p.map(|x| x.to_string()));
        put("repeat_penalty", self.repeat_penalty.map(|x| x.to_string()));
        put("penalty_last_n", self.penalty_last_n.map(|x| x.to_string()));
        (!parts.is_empty()).then(|| parts.join(", "))
    }
}

/// xoshiro256** seeded through SplitMix64.
#[derive(Clone, Debug)]
struct Xoshiro256 {
    s: [u64; 4],
}

impl Xoshiro256 {
    fn new(seed: u64) -> Self {
        let mut sm = seed;
        let mut next = || {
            sm = sm.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = sm;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Xoshiro256 { s: [next(), next(), next(), next()] }
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1) with 53 random bits.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// `e^x` from IEEE basic operations only (no platform libm, no FMA), so it gives the same bits
/// on every target. Relative error about 1e-16.
fn exp_det(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    if x > 709.782_712_893_384 {
        return f64::INFINITY;
    }
    if x < -745.2 {
        return 0.0;
    }
    // fdlibm's split of ln 2: LN2_HI has trailing zero bits, so k * LN2_HI is exact.
    const LN2_HI: f64 = f64::from_bits(0x3FE6_2E42_FEE0_0000);
    const LN2_LO: f64 = f64::from_bits(0x3DEA_39EF_3579_3C76);
    let k = (x * std::f64::consts::LOG2_E).round();
    let r = (x - k * LN2_HI) - k * LN2_LO; // |r| <= ~0.347
                                           // Taylor series to degree 13 (error < 1e-17 on |r| <= 0.35), Horner form.
    let mut p = 1.0;
    let mut i = 13.0;
    while i >= 1.0 {
        p = 1.0 + r * p / i;
        i -= 1.0;
    }
    let k = k as i32;
    if k >= -1022 {
        p * f64::from_bits(((k + 1023) as u64) << 52)
    } else {
        // Two exact steps so the scale factor itself does not underflow.
        p * f64::from_bits(((k + 600 + 1023) as u64) << 52) * f64::from_bits(((1023 - 600) as u64) << 52)
    }
}

/// NaN as `-inf`, so comparisons are total.
#[inline]
fn clean(x: f32) -> f32 {
    if x.is_nan() {
        f32::NEG_INFINITY
    } else {
        x
    }
}

/// Higher logit first, then lower id.
#[inline]
fn by_logit_desc(a: &(f32, u32), b: &(f32, u32)) -> Ordering {
    b.0.partial_cmp(&a.0).unwrap_or(Ordering::Equal).then(a.1.cmp(&b.1))
}

/// Index of the highest value, the lowest index on ties (NaN counts as `-inf`).
fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &x) in xs.iter().enumerate() {
        let x = clean(x);
        if x > best_v {
            best_v = x;
            best = i;
        }
    }
    best as u32
}

/// A seeded sampler with the token history the penalties need.
#[derive(Clone, Debug)]
pub struct Sampler {
    cfg: SamplerConfig,
    rng: Xoshiro256,
    /// The last `penalty_last_n` accepted tokens, oldest first.
    history: VecDeque<u32>,
    /// Reused buffers.
    logits: Vec<f32>,
    cand: Vec<(f32, u32)>,
}

impl Sampler {
    /// A sampler for `cfg`. An invalid config (see [`SamplerConfig::validate`]) still samples
    /// something, but callers should validate user input first.
    pub fn new(cfg: SamplerConfig) -> Self {
        Sampler { rng: Xoshiro256::new(cfg.seed), history: VecDeque::with_capacity(cfg.penalty_last_n.min(4096)), cfg, logits: Vec::new(), cand: Vec::new() }
    }

    /// The config it samples with.
    pub fn config(&self) -> &SamplerConfig {
        &self.cfg
    }

    /// The tokens the penalties currently look at, oldest first.
    pub fn history(&self) -> impl Iterator<Item = u32> + '_ {
        self.history.iter().copied()
    }

    /// Records a token that was emitted (sampled or forced, e.g. the prompt's tokens) for the
    /// penalties. [`Sampler::sample`] does not record its own choice: call this with it.
    pub fn accept(&mut self, id: u32) {
        let n = self.cfg.penalty_last_n;
        if n == 0 {
            return;
        }
        while self.history.len() >= n {
            self.history.pop_front();
        }
        self.history.push_back(id);
    }

    /// Forgets the history and reseeds the RNG from `config.seed`: the sampler then behaves
    /// exactly as a new one.
    pub fn reset(&mut self) {
        self.history.clear();
        self.rng = Xoshiro256::new(self.cfg.seed);
    }

    /// Picks the next token from one row of logits (one per vocabulary entry).
    ///
    /// Panics if `logits` is empty. If every logit is `-inf`/NaN the answer is token 0.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        assert!(!logits.is_empty(), "Sampler::sample: empty logits");
        let cfg = &self.cfg;

        // Penalties, on a copy.
        let logits: &[f32] = if cfg.has_penalties() && !self.history.is_empty() {
            self.logits.clear();
            self.logits.extend_from_slice(logits);
            apply_penalties(&mut self.logits, &self.history, cfg);
            &self.logits
        } else {
            logits
        };

        if cfg.is_greedy() {
            return argmax(logits);
        }

        // Candidates, without -inf (probability 0).
        let mut cand = std::mem::take(&mut self.cand);
        cand.clear();
        cand.extend(logits.iter().enumerate().map(|(i, &l)| (clean(l), i as u32)).filter(|c| c.0 > f32::NEG_INFINITY));
        let id = if cand.is_empty() { argmax(logits) } else { self.draw(&mut cand) };
        self.cand = cand;
        id
    }

    /// How many of the best logits this sampler's next choice depends on, where that is at most
    /// `max_k`: [`SamplerConfig::best_logits_needed`], and with penalties that only lower logits
    /// (repeat_penalty >= 1, frequency and presence >= 0) the chain's k plus the number of
    /// distinct tokens in the penalty window. Lowering at most p tokens can lift no token from
    /// below the (k + p)-th place into the k best, so the GPU's top-k still suffices and a
    /// repetition penalty does not force reading back every logit. None: every logit is needed.
    pub fn best_logits_needed(&self, max_k: usize) -> Option<usize> {
        let cfg = &self.cfg;
        if !cfg.has_penalties() || self.history.is_empty() {
            let plain = SamplerConfig { repeat_penalty: 1.0, frequency_penalty: 0.0, presence_penalty: 0.0, ..cfg.clone() };
            return plain.best_logits_needed(max_k);
        }
        if cfg.repeat_penalty < 1.0 || cfg.frequency_penalty < 0.0 || cfg.presence_penalty < 0.0 {
            return None;
        }
        let k = if cfg.is_greedy() { 1 } else { cfg.top_k };
        if k == 0 {
            return None;
        }
        let mut window: Vec<u32> = self.history.iter().copied().collect();
        window.sort_unstable();
        window.dedup();
        Some(k + window.len()).filter(|&n| n <= max_k)
    }

    /// Picks the next token from the best (id, logit) pairs of the logits, highest first and the
    /// lower id first on ties, as many as [`Sampler::best_logits_needed`] says: the token
    /// [`Sampler::sample`] picks from the whole row. Penalties are applied to the candidates,
    /// which are then cut back to the chain's k.
    ///
    /// Panics if `best` is empty.
    pub fn sample_top(&mut self, best: &[(u32, f32)]) -> u32 {
        assert!(!best.is_empty(), "Sampler::sample_top: no candidates");
        let mut cand = std::mem::take(&mut self.cand);
        cand.clear();
        cand.extend(best.iter().map(|&(id, l)| (clean(l), id)));
        if self.cfg.has_penalties() && !self.history.is_empty() {
            for c in cand.iter_mut() {
                let count = self.history.iter().filter(|&&h| h == c.1).count();
                if count > 0 {
                    c.0 = penalized(c.0, count as f32, &self.cfg);
                }
            }
            cand.sort_unstable_by(by_logit_desc);
            let k = if self.cfg.is_greedy() { 1 } else { self.cfg.top_k };
            cand.truncate(k.max(1));
        }
        let first = cand.first().map_or(best[0].0, |c| c.1);
        let id = if self.cfg.is_greedy() {
            first
        } else {
            cand.retain(|c| c.0 > f32::NEG_INFINITY);
            if cand.is_empty() {
                first
            } else {
                self.draw(&mut cand)
            }
        };
        self.cand = cand;
        id
    }

    /// Continues with `other`'s random draws (a clone that judged a draft drew for this one).
    pub fn continue_draws_from(&mut self, other: &Sampler) {
        self.rng = other.rng.clone();
    }

    /// llama.cpp's chain after the penalties over the candidates (logit, id), none of them -inf.
    fn draw(&mut self, cand: &mut Vec<(f32, u32)>) -> u32 {
        let cfg = &self.cfg;

        // Top-k.
        if cfg.top_k > 0 && cfg.top_k < cand.len() {
            cand.select_nth_unstable_by(cfg.top_k - 1, by_logit_desc);
            cand.truncate(cfg.top_k);
        }

        let max = cand.iter().fold(f32::NEG_INFINITY, |m, c| m.max(c.0)) as f64;

        // Top-p needs the normaliser at temperature 1 over all candidates that survived top-k.
        let use_top_p = cfg.top_p < 1.0;
        let z: f64 = if use_top_p { cand.iter().map(|c| exp_det(c.0 as f64 - max)).sum() } else { 1.0 };

        // Min-p keeps a prefix of the sorted order, and so does top-p: applying min-p first
        // (before sorting, to sort fewer) and cutting top-p within what is left gives the same
        // set as llama.cpp's order, since top-p's cumulative sums use the full normaliser.
        if cfg.min_p > 0.0 {
            let min_p = cfg.min_p as f64;
            cand.retain(|c| exp_det(c.0 as f64 - max) >= min_p);
        }

        cand.sort_unstable_by(by_logit_desc);

        if use_top_p {
            let p = cfg.top_p as f64;
            let mut cum = 0.0;
            let mut keep = cand.len();
            for (i, c) in cand.iter().enumerate() {
                cum += exp_det(c.0 as f64 - max) / z;
                if cum >= p {
                    keep = i + 1;
                    break;
                }
            }
            cand.truncate(keep);
        }

        if cand.len() == 1 {
            return cand[0].1;
        }

        // Temperature, softmax, draw.
        let inv_t = 1.0 / cfg.temperature as f64;
        let mut total = 0.0;
        let weights: Vec<f64> = cand
            .iter()
            .map(|c| {
                let w = exp_det((c.0 as f64 - max) * inv_t);
                total += w;
                w
            })
            .collect();
        let u = self.rng.next_f64() * total;
        let mut acc = 0.0;
        for (c, w) in cand.iter().zip(&weights) {
            acc += w;
            if u < acc {
                return c.1;
            }
        }
        // Rounding left u at the very top: the last candidate with nonzero weight.
        cand.iter().zip(&weights).rev().find(|(_, &w)| w > 0.0).map_or(cand[0].1, |(c, _)| c.1)
    }
}

/// llama.cpp's penalties sampler over the history window.
fn apply_penalties(logits: &mut [f32], history: &VecDeque<u32>, cfg: &SamplerConfig) {
    let mut ids: Vec<u32> = history.iter().copied().filter(|&id| (id as usize) < logits.len()).collect();
    ids.sort_unstable();
    let mut i = 0;
    while i < ids.len() {
        let id = ids[i];
        let mut j = i;
        while j < ids.len() && ids[j] == id {
            j += 1;
        }
        let l = &mut logits[id as usize];
        *l = penalized(*l, (j - i) as f32, cfg);
        i = j;
    }
}

/// One logit after llama.cpp's penalties, for a token seen `count` times in the window.
fn penalized(l: f32, count: f32, cfg: &SamplerConfig) -> f32 {
    let l = if l <= 0.0 { l * cfg.repeat_penalty } else { l / cfg.repeat_penalty };
    l - (count * cfg.frequency_penalty + cfg.presence_penalty)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_det_matches_std() {
        let mut x = -700.0;
        while x < 709.0 {
            let (a, b) = (exp_det(x), x.exp());
            assert!(((a - b) / b).abs() < 4e-16, "exp({x}): {a} vs {b}");
            x += 0.37;
        }
        for x in [0.0, -1e-300, 1e-10, -0.5, 0.5, -30.25, 1.0] {
            let (a, b) = (exp_det(x), f64::exp(x));
            assert!(((a - b) / b).abs() < 4e-16, "exp({x}): {a} vs {b}");
        }
        // Subnormal results: same to within one unit of the smallest subnormal.
        for x in [-710.0, -720.5, -740.0, -744.9] {
            assert!((exp_det(x) - x.exp()).abs() <= 5e-324, "exp({x})");
        }
        assert_eq!(exp_det(f64::NEG_INFINITY), 0.0);
        assert_eq!(exp_det(f64::INFINITY), f64::INFINITY);
    }

    fn model_sampling(keys: &[(&str, crate::gguf::MetadataValue)]) -> SamplingOverrides {
        let mut w = crate::gguf::GgufWriter::new();
        w.add_metadata("general.architecture", "llama");
        for (k, v) in keys {
            w.add_metadata(format!("general.sampling.{k}"), v.clone());
        }
        SamplingOverrides::from_gguf(&crate::gguf::Gguf::parse(&w.to_bytes()).unwrap())
    }

    #[test]
    fn model_sampling_overrides_only_what_the_model_sets() {
        let m = model_sampling(&[("temp", 0.2f32.into()), ("top_k", 20i32.into()), ("penalty_last_n", 32u32.into())]);
        assert!(m.ignored.is_empty(), "{:?}", m.ignored);
        let c = m.defaults();
        let d = SamplerConfig::default();
        assert_eq!((c.temperature, c.top_k, c.penalty_last_n), (0.2, 20, 32));
        assert_eq!((c.top_p, c.min_p, c.repeat_penalty, c.seed), (d.top_p, d.min_p, d.repeat_penalty, d.seed));
        assert_eq!(m.describe().as_deref(), Some("temp 0.2, top_k 20, penalty_last_n 32"));
        assert_eq!(model_sampling(&[]).defaults(), d);
        assert_eq!(model_sampling(&[]).describe(), None);
    }

    /// The k best (id, logit) of a row, highest first and the lower id first: what the GPU's
    /// top-k returns.
    fn top_of(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
        let mut all: Vec<(f32, u32)> = logits.iter().enumerate().map(|(i, &l)| (clean(l), i as u32)).collect();
        all.sort_unstable_by(by_logit_desc);
        all.truncate(k);
        all.into_iter().map(|(l, id)| (id, l)).collect()
    }

    #[test]
    fn penalties_choose_from_the_top_k_as_from_every_logit() {
        // repeated tokens among the best, ties, negative logits: the two paths pick the same
        // token for every seed, greedy and sampled
        let mut rng = Xoshiro256::new(7);
        let mut checked = 0;
        for round in 0..400u64 {
            let n = 300;
            let logits: Vec<f32> = (0..n).map(|_| ((rng.next_f64() * 16.0 - 6.0) as f32 * 4.0).round() / 4.0).collect();
            let cfg = SamplerConfig {
                temperature: if round % 4 == 0 { 0.0 } else { 0.9 },
                top_k: [1, 5, 20, 40][round as usize % 4],
                top_p: if round % 3 == 0 { 1.0 } else { 0.9 },
                min_p: if round % 5 == 0 { 0.0 } else { 0.05 },
                repeat_penalty: [1.0, 1.1, 1.5, 3.0][(round / 4) as usize % 4],
                frequency_penalty: if round % 7 == 0 { 0.5 } else { 0.0 },
                presence_penalty: if round % 11 == 0 { 1.0 } else { 0.0 },
                penalty_last_n: 64,
                seed: round,
            };
            let mut full = Sampler::new(cfg.clone());
            // the window repeats some of the best tokens and some others
            let best = top_of(&logits, 30);
            for i in 0..70 {
                let id = if i % 3 == 0 { best[(rng.next_u64() % 30) as usize].0 } else { (rng.next_u64() % n as u64) as u32 };
                full.accept(id);
            }
            let mut top = full.clone();
            let Some(k) = top.best_logits_needed(MAX_K) else {
                assert!(!cfg.has_penalties() || cfg.top_k == 0, "{cfg:?}");
                continue;
            };
            for _ in 0..5 {
                let a = full.sample(&logits);
                let b = top.sample_top(&top_of(&logits, k));
                assert_eq!(a, b, "round {round}: {cfg:?}, k {k}");
            }
            checked += 1;
        }
        assert!(checked > 300, "{checked}");
        // penalties that raise logits need every logit
        let mut s = Sampler::new(SamplerConfig { repeat_penalty: 0.8, ..Default::default() });
        s.accept(3);
        assert_eq!(s.best_logits_needed(MAX_K), None);
        let mut s = Sampler::new(SamplerConfig { presence_penalty: -1.0, ..Default::default() });
        s.accept(3);
        assert_eq!(s.best_logits_needed(MAX_K), None);
    }
    const MAX_K: usize = 128;

    #[test]
    fn bad_model_sampling_values_are_skipped_and_named() {
        let m = model_sampling(&[("temp", (-1.0f32).into()), ("top_p", 0.0f32.into()), ("top_k", "forty".into()), ("min_p", 0.1f32.into())]);
        assert_eq!((m.temperature, m.top_p, m.top_k, m.min_p), (None, None, None, Some(0.1)));
        assert_eq!(m.ignored.len(), 3, "{:?}", m.ignored);
        assert!(m.ignored[0].contains("general.sampling.temp = -1") && m.ignored[0].contains(">= 0"), "{:?}", m.ignored);
        assert!(m.ignored[1].contains("general.sampling.top_k") && m.ignored[1].contains("number"), "{:?}", m.ignored);
        m.defaults().validate().unwrap();
    }
}
