//! Pipelines: how a kernel binds its buffers, every pipeline the ops can build, and building one
//! on a device (`Gpu::pipeline`, cached in the device's `PipelineCache`).

use super::{
    adamw, attention, attention_backward, copy, cross_entropy, elementwise, gather, glu_backward, norm, norm_backward, product, product_backward, rope_kv,
    skinny_product, softmax, top_k, weight_gradient,
};
use crate::device::{Gpu, GpuError, Pipeline, PipelineKey};
use crate::shaders;
use std::sync::Arc;

/// How a kernel uses each binding, in binding order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bind {
    Read,
    ReadWrite,
    Uniform,
}
use Bind::*;

/// Every pipeline the runtime can build for some input, for validating all generated WGSL: each
/// op file lists its own.
pub fn all_pipeline_keys() -> Vec<PipelineKey> {
    [
        product::pipeline_keys(),
        gather::pipeline_keys(),
        norm::pipeline_keys(),
        softmax::pipeline_keys(),
        elementwise::pipeline_keys(),
        rope_kv::pipeline_keys(),
        attention::pipeline_keys(),
        top_k::pipeline_keys(),
        copy::pipeline_keys(),
        product_backward::pipeline_keys(),
        weight_gradient::pipeline_keys(),
        norm_backward::pipeline_keys(),
        glu_backward::pipeline_keys(),
        cross_entropy::pipeline_keys(),
        adamw::pipeline_keys(),
        skinny_product::pipeline_keys(),
        attention_backward::pipeline_keys(),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// The layout a pipeline key uses.
pub fn layout_of(file: &str) -> &'static [Bind] {
    match file {
        "matvec.wgsl" => product::MATVEC_LAYOUT,
        "matmul.wgsl" => product::MATMUL_LAYOUT,
        "gather.wgsl" => gather::GATHER_LAYOUT,
        "norm.wgsl" => norm::NORM_LAYOUT,
        "softmax.wgsl" => softmax::SOFTMAX_LAYOUT,
        "elementwise.wgsl" => elementwise::ELEMENTWISE_LAYOUT,
        "rope_kv.wgsl" => rope_kv::ROPE_KV_LAYOUT,
        "attention_workgroup.wgsl" | "attention_query.wgsl" | "attention_tile.wgsl" => attention::ATTENTION_LAYOUT,
        "attention_merge.wgsl" => attention::ATTENTION_MERGE_LAYOUT,
        "topk.wgsl" => top_k::TOPK_LAYOUT,
        "copy.wgsl" => copy::COPY_LAYOUT,
        "product_backward.wgsl" => product_backward::PRODUCT_BACKWARD_LAYOUT,
        "weight_gradient.wgsl" => weight_gradient::WEIGHT_GRADIENT_LAYOUT,
        "norm_backward.wgsl" => norm_backward::NORM_BACKWARD_LAYOUT,
        "glu_backward.wgsl" => glu_backward::GLU_BACKWARD_LAYOUT,
        "cross_entropy.wgsl" => cross_entropy::CROSS_ENTROPY_LAYOUT,
        "adamw.wgsl" => adamw::ADAMW_LAYOUT,
        "skinny_product.wgsl" => skinny_product::SKINNY_PRODUCT_LAYOUT,
        "attention_backward.wgsl" => attention_backward::ATTENTION_BACKWARD_LAYOUT,
        other => panic!("no layout for {other}"),
    }
}

/// A shader file, its parameters' (field, byte offset) pairs, and their size.
pub type ParamsLayout = (&'static str, &'static [(&'static str, usize)], usize);

/// Each shader's parameters as Rust lays them out: (file, [(field, byte offset)], size), for
/// the test that compares them with the WGSL `struct Params` (matmul.wgsl reads a prefix).
pub fn params_layouts() -> Vec<ParamsLayout> {
    use std::mem::size_of;
    vec![
        ("matvec.wgsl", product::ProductParams::FIELDS, size_of::<product::ProductParams>()),
        ("matmul.wgsl", product::ProductParams::FIELDS, size_of::<product::ProductParams>()),
        ("gather.wgsl", gather::GatherParams::FIELDS, size_of::<gather::GatherParams>()),
        ("norm.wgsl", norm::NormParams::FIELDS, size_of::<norm::NormParams>()),
        ("softmax.wgsl", softmax::SoftmaxParams::FIELDS, size_of::<softmax::SoftmaxParams>()),
        ("elementwise.wgsl", elementwise::ElementwiseParams::FIELDS, size_of::<elementwise::ElementwiseParams>()),
        ("rope_kv.wgsl", rope_kv::RopeKvParams::FIELDS, size_of::<rope_kv::RopeKvParams>()),
        ("attention_workgroup.wgsl", attention::AttentionParams::FIELDS, size_of::<attention::AttentionParams>()),
        ("attention_query.wgsl", attention::AttentionParams::FIELDS, size_of::<attention::AttentionParams>()),
        ("attention_tile.wgsl", attention::AttentionParams::FIELDS, size_of::<attention::AttentionParams>()),
        ("attention_merge.wgsl", attention::AttentionParams::FIELDS, size_of::<attention::AttentionParams>()),
        ("topk.wgsl", top_k::TopKParams::FIELDS, size_of::<top_k::TopKParams>()),
        ("copy.wgsl", copy::CopyParams::FIELDS, size_of::<copy::CopyParams>()),
        ("product_backward.wgsl", product_backward::ProductBackwardParams::FIELDS, size_of::<product_backward::ProductBackwardParams>()),
        ("weight_gradient.wgsl", weight_gradient::WeightGradientParams::FIELDS, size_of::<weight_gradient::WeightGradientParams>()),
        ("norm_backward.wgsl", norm_backward::NormBackwardParams::FIELDS, size_of::<norm_backward::NormBackwardParams>()),
        ("glu_backward.wgsl", glu_backward::GluBackwardParams::FIELDS, size_of::<glu_backward::GluBackwardParams>()),
        ("cross_entropy.wgsl", cross_entropy::CrossEntropyParams::FIELDS, size_of::<cross_entropy::CrossEntropyParams>()),
        ("adamw.wgsl", adamw::AdamWParams::FIELDS, size_of::<adamw::AdamWParams>()),
        ("skinny_product.wgsl", skinny_product::SkinnyProductParams::FIELDS, size_of::<skinny_product::SkinnyProductParams>()),
        ("attention_backward.wgsl", attention_backward::AttentionBackwardParams::FIELDS, size_of::<attention_backward::AttentionBackwardParams>()),
    ]
}

impl Gpu {
    /// The compiled pipeline for `key` on this device's variant, built on first use.
    pub async fn pipeline(&self, key: PipelineKey) -> Result<Arc<Pipeline>, GpuError> {
        if let Some(p) = self.pipelines.get(&key) {
            return Ok(p);
        }
        let source = shaders::generate(key.file, self.variant, &key.defines).map_err(|e| GpuError::Validation { what: "generating WGSL".into(), message: e })?;
        let bind = layout_of(key.file);
        let what = format!("building {}:{} {:?}", key.file, key.entry, key.defines.0.keys().collect::<Vec<_>>());
        let p = self
            .scoped(&what, 0, || {
                let entries: Vec<wgpu::BindGroupLayoutEntry> = bind
                    .iter()
                    .enumerate()
                    .map(|(i, b)| wgpu::BindGroupLayoutEntry {
                        binding: i as u32,
                        visibility: wgpu::ShaderStages::COMPUTE,
                        ty: match b {
                            Read | ReadWrite => wgpu::BindingType::Buffer {
                                ty: wgpu::BufferBindingType::Storage { read_only: *b == Read },
                                has_dynamic_offset: false,
                                min_binding_size: None,
                            },
                            // each dispatch's slot of its recorder's parameter buffer
                            Uniform => wgpu::BindingType::Buffer { ty: wgpu::BufferBindingType::Uniform, has_dynamic_offset: true, min_binding_size: None },
                        },
                        count: None,
                    })
                    .collect();
                let layout = self.device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor { label: Some(key.file), entries: &entries });
                let pl = self.device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                    label: Some(key.file),
                    bind_group_layouts: &[Some(&layout)],
                    immediate_size: 0,
                });
                let desc = wgpu::ShaderModuleDescriptor { label: Some(key.file), source: wgpu::ShaderSource::Wgsl(source.into()) };
                let module = match std::env::var("NOMOAT_SHADER_CHECKS").ok().as_deref() {
                    Some("none") => unsafe { self.device.create_shader_module_trusted(desc, wgpu::ShaderRuntimeChecks::unchecked()) },
                    Some("bounds") => unsafe {
                        let mut c = wgpu::ShaderRuntimeChecks::unchecked();
                        c.bounds_checks = true;
                        self.device.create_shader_module_trusted(desc, c)
                    },
                    _ => self.device.create_shader_module(desc),
                };
                let pipeline = self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(key.entry),
                    layout: Some(&pl),
                    module: &module,
                    entry_point: Some(key.entry),
                    compilation_options: Default::default(),
                    cache: None,
                });
                Pipeline { pipeline, layout }
            })
            .await?;
        let p = Arc::new(p);
        self.pipelines.insert(key, p.clone());
        Ok(p)
    }
}
