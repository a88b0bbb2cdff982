//! Fine-tuning LoRA adapters: the data (`data`: the three JSONL formats and their loss masks)
//! and one sequence's forward and backward pass on the GPU (`step`).
//! The base model stays as stored and frozen; only the adapters' A and B learn.

pub mod data;
pub mod step;
