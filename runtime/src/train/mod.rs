//! Fine-tuning LoRA adapters: the data (`data`: the three JSONL formats and their loss masks),
//! one sequence's forward and backward pass on the GPU (`step`), and a run's loop of optimizer
//! steps over the data (`run`).
//! The base model stays as stored and frozen; only the adapters' A and B learn.

pub mod data;
pub mod run;
pub mod step;
