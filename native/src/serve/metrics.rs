//! `/metrics`: the server's counters in Prometheus' text exposition format (version 0.0.4), as
//! llama.cpp's server and vLLM offer them: requests, tokens in and out, queue depth, running
//! requests and slots, generation speed, KV cache use.

use std::collections::VecDeque;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Counters the engine keeps for `/metrics` (and `/health`'s subset).
#[derive(Default)]
pub struct Counters {
    /// Prompt tokens of finished requests, and of those the ones found in a slot's cache.
    pub prompt_tokens: AtomicU64,
    pub cached_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    /// Requests in a slot now.
    pub running: AtomicUsize,
    pub slots: AtomicUsize,
    /// Tokens the slots' caches hold, and how many they can.
    pub kv_tokens: AtomicUsize,
    pub kv_capacity: AtomicUsize,
    pub rate: Rate,
}

/// Tokens generated over the last RATE_WINDOW, for a tokens-per-second gauge.
#[derive(Default)]
pub struct Rate(Mutex<VecDeque<(Instant, u32)>>);

const RATE_WINDOW: Duration = Duration::from_secs(10);

impl Rate {
    /// `tokens` generated just now.
    pub fn add(&self, tokens: u32) {
        let mut w = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        w.push_back((now, tokens));
        while w.front().is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW) {
            w.pop_front();
        }
    }

    /// Tokens a second over the window (0 when nothing was generated in it).
    pub fn per_second(&self) -> f64 {
        let w = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let recent: u32 = w.iter().filter(|(t, _)| now.duration_since(*t) <= RATE_WINDOW).map(|(_, n)| n).sum();
        recent as f64 / RATE_WINDOW.as_secs_f64()
    }
}

/// What `/metrics` reports besides the engine's counters.
pub struct Snapshot<'a> {
    pub counters: &'a Counters,
    pub requests: u64,
    pub queued: usize,
    pub busy: bool,
    pub gpu_bytes: i64,
}

/// The text of `/metrics`.
pub fn render(s: &Snapshot<'_>) -> String {
    let c = s.counters;
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: String| {
        let _ = writeln!(out, "# HELP nomoat_{name} {help}\n# TYPE nomoat_{name} {kind}\nnomoat_{name} {value}");
    };
    let n = |a: &AtomicU64| a.load(Ordering::Relaxed).to_string();
    let u = |a: &AtomicUsize| a.load(Ordering::Relaxed).to_string();
    metric("requests_total", "counter", "Requests finished (replied, failed or cancelled).", s.requests.to_string());
    metric("prompt_tokens_total", "counter", "Prompt tokens of finished requests.", n(&c.prompt_tokens));
    metric("prompt_tokens_cached_total", "counter", "Prompt tokens found in a slot's KV cache, not evaluated again.", n(&c.cached_tokens));
    metric("generated_tokens_total", "counter", "Tokens generated.", n(&c.generated_tokens));
    metric("requests_waiting", "gauge", "Requests in the queue, waiting for a slot.", s.queued.to_string());
    metric("requests_running", "gauge", "Requests in a slot.", u(&c.running));
    metric("slots", "gauge", "Requests decoded together at most (--parallel).", u(&c.slots));
    metric("busy", "gauge", "1 while the engine is generating.", (s.busy as u8).to_string());
    metric("generation_tokens_per_second", "gauge", "Tokens generated a second over the last 10 s, all requests together.", format!("{:.3}", c.rate.per_second()));
    metric("kv_cache_tokens", "gauge", "Tokens held in the slots' KV caches.", u(&c.kv_tokens));
    metric("kv_cache_capacity_tokens", "gauge", "Tokens the slots' KV caches can hold.", u(&c.kv_capacity));
    let kv_use = c.kv_tokens.load(Ordering::Relaxed) as f64 / c.kv_capacity.load(Ordering::Relaxed).max(1) as f64;
    metric("kv_cache_usage_ratio", "gauge", "Share of the KV cache in use (0 to 1).", format!("{kv_use:.4}"));
    metric("gpu_buffer_bytes", "gauge", "Bytes of GPU buffers alive after the last request (-1 where the driver does not say).", s.gpu_bytes.to_string());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every sample line follows its HELP and TYPE lines and parses as `name value`.
    #[test]
    fn renders_prometheus_text() {
        let c = Counters::default();
        c.prompt_tokens.store(12, Ordering::Relaxed);
        c.kv_tokens.store(5, Ordering::Relaxed);
        c.kv_capacity.store(20, Ordering::Relaxed);
        c.rate.add(30);
        let text = render(&Snapshot { counters: &c, requests: 3, queued: 1, busy: true, gpu_bytes: -1 });
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len() % 3, 0);
        for trio in lines.chunks(3) {
            let name = trio[0].strip_prefix("# HELP ").unwrap().split(' ').next().unwrap();
            assert!(trio[1].starts_with(&format!("# TYPE {name} ")), "{trio:?}");
            let (sample, value) = trio[2].split_once(' ').unwrap();
            assert_eq!(sample, name);
            value.parse::<f64>().unwrap();
        }
        assert!(text.contains("\nnomoat_prompt_tokens_total 12\n"));
        assert!(text.contains("\nnomoat_kv_cache_usage_ratio 0.2500\n"));
        assert!(text.contains("\nnomoat_generation_tokens_per_second 3.000\n"));
        assert!(text.contains("\nnomoat_requests_waiting 1\n"));
    }
}
