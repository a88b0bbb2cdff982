//! `nomoat serve`'s default `--parallel`: as many sequences as pay on the device
//! (`Tuning::decode_slots`), fewer when their KV caches would not fit the memory there is.

use nomoat_runtime::arch::Config;
use nomoat_runtime::device::Gpu;
use nomoat_runtime::ops::{KvType, MAX_SEQ_ROWS};

/// The KV cache of all slots may take this share of the memory left: a CPU device's available
/// system memory, or what `--max-gpu-memory` leaves after the weights (the rest is for
/// scratch buffers, the other programs, and the requests' own growth).
const SHARE: u64 = 4;

/// A GPU's memory is not reported through wgpu; without `--max-gpu-memory`, all slots' KV
/// caches stay within this (one slot always fits: a model too large for it still gets one).
const GPU_KV_BYTES: u64 = 1 << 30;

/// The chosen slot count and why, for the start-up line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub n: usize,
    pub why: String,
}

/// What limits the slot count: each slot's memory and the room for all of them.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Sequences the device decodes together profitably.
    pub pays: usize,
    /// Bytes one slot adds: its KV cache and its rows of logits.
    pub per_slot: u64,
    /// Slots whose per-layer cache fits one storage binding.
    pub binding_slots: usize,
    /// Bytes all slots may take, and what that is (for the message).
    pub room: u64,
    pub room_is: &'static str,
}

/// The default for this device, model, context and cache type. `budget`: `--max-gpu-memory`
/// in bytes.
pub fn choose_for(gpu: &Gpu, c: &Config, n_ctx: usize, kv: KvType, budget: Option<u64>) -> Choice {
    let per_token = c.kv_bytes_per_token(kv);
    // one layer's keys (or values): the buffer a binding must hold
    let kv_layer_per_slot = (per_token / (2 * c.n_layer.max(1) as u64)).saturating_mul(n_ctx as u64);
    let per_slot = per_token.saturating_mul(n_ctx as u64).saturating_add(3 * 4 * c.n_vocab as u64);
    let (room, room_is) = match budget {
        Some(b) => (b.saturating_sub(gpu.buffer_memory().unwrap_or(0).max(0) as u64) / SHARE, "a quarter of what --max-gpu-memory leaves after the weights"),
        None if gpu.tuning.cpu => (available_memory().unwrap_or(GPU_KV_BYTES * SHARE) / SHARE, "a quarter of the available system memory"),
        None => (GPU_KV_BYTES, "1 GiB (wgpu does not report the GPU's memory; --max-gpu-memory sets it)"),
    };
    choose(Limits {
        pays: gpu.tuning.decode_slots,
        per_slot,
        binding_slots: usize::try_from(gpu.max_binding() / kv_layer_per_slot.max(1)).unwrap_or(usize::MAX),
        room,
        room_is,
    })
}

/// The arithmetic of [`choose_for`].
pub fn choose(l: Limits) -> Choice {
    let by_memory = usize::try_from(l.room / l.per_slot.max(1)).unwrap_or(usize::MAX);
    let n = l.pays.min(MAX_SEQ_ROWS).min(by_memory).min(l.binding_slots).max(1);
    let mib = |b: u64| (b + (1 << 19)) >> 20;
    let why = if n == l.pays.min(MAX_SEQ_ROWS) {
        format!("what pays on this device; {n} x {} MiB of KV cache", mib(l.per_slot))
    } else if n == l.binding_slots.max(1) && l.binding_slots < by_memory {
        format!("the most whose per-layer cache fits this device's largest buffer; {} MiB each", mib(l.per_slot))
    } else {
        format!("the KV caches that fit {} ({} MiB); {} MiB each", l.room_is, mib(l.room), mib(l.per_slot))
    };
    Choice { n, why }
}

/// MemAvailable from /proc/meminfo, in bytes (Linux); None elsewhere.
fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(pays: usize, per_slot_mib: u64, binding_slots: usize, room_mib: u64) -> Limits {
        Limits { pays, per_slot: per_slot_mib << 20, binding_slots, room: room_mib << 20, room_is: "the room" }
    }

    #[test]
    fn the_device_choice_under_the_memory_and_binding_limits() {
        // plenty of memory: what pays
        let c = choose(limits(4, 24, 1000, 4096));
        assert_eq!(c.n, 4);
        assert!(c.why.contains("what pays") && c.why.contains("4 x 24 MiB"), "{}", c.why);
        // memory for two slots
        let c = choose(limits(8, 512, 1000, 1100));
        assert_eq!(c.n, 2);
        assert!(c.why.contains("fit the room (1100 MiB); 512 MiB each"), "{}", c.why);
        // not even one fits: still one (loading then says what does not fit)
        assert_eq!(choose(limits(8, 2048, 1000, 1000)).n, 1);
        // the binding limit
        let c = choose(limits(8, 24, 3, 4096));
        assert_eq!(c.n, 3);
        assert!(c.why.contains("largest buffer"), "{}", c.why);
        // never beyond what a step decodes
        assert_eq!(choose(limits(64, 1, 1000, 4096)).n, MAX_SEQ_ROWS);
        assert_eq!(choose(limits(1, 1, 1000, 4096)).n, 1);
    }
}
