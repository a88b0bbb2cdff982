//! Softmax cross-entropy over the vocabulary, per position, with its gradient
//! (cross_entropy.wgsl).

use super::pipeline::Bind::{self, *};
use super::{grid, Recorder};
use crate::device::{GpuError, PipelineKey};
use crate::shaders::Defines;

/// cross_entropy.wgsl's bindings, in order: logits, targets, weights, grad, loss, params.
pub const CROSS_ENTROPY_LAYOUT: &[Bind] = &[Read, Read, Read, ReadWrite, ReadWrite, Uniform];

params! {
    /// cross_entropy.wgsl's `struct Params`.
    struct CrossEntropyParams {
        n_vocab: u32,
        n_rows: u32,
        _pad: [u32; 2],
    }
}

pub(super) fn pipeline_keys() -> Vec<PipelineKey> {
    vec![PipelineKey { file: "cross_entropy.wgsl", entry: "main", defines: Defines::new() }]
}

impl Recorder<'_> {
    /// loss[t] = weights[t] · (logsumexp(logits[t]) − logits[t][targets[t]]) and grad[t] =
    /// weights[t] · (softmax(logits[t]) − onehot(targets[t])) for logits, grad:
    /// [n_rows][n_vocab]; targets (u32), weights, loss: [n_rows].
    #[allow(clippy::too_many_arguments)]
    pub async fn cross_entropy(
        &mut self,
        logits: &wgpu::Buffer,
        targets: &wgpu::Buffer,
        weights: &wgpu::Buffer,
        grad: &wgpu::Buffer,
        loss: &wgpu::Buffer,
        n_vocab: u32,
        n_rows: u32,
    ) -> Result<(), GpuError> {
        let (gx, gy) = grid(n_rows);
        let params = CrossEntropyParams { n_vocab, n_rows, _pad: [0; 2] };
        self.dispatch(PipelineKey { file: "cross_entropy.wgsl", entry: "main", defines: Defines::new() }, &[logits, targets, weights, grad, loss], &params, (gx, gy, 1))
            .await
    }
}
