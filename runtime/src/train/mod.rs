//! Fine-tuning LoRA adapters: the data (`data`: the three JSONL formats and their loss masks).
//! The base model stays as stored and frozen; only the adapters' A and B learn.

pub mod data;
