//! What loading a model or an adapter can go wrong with, and where their bytes come from.

use crate::device::GpuError;
use crate::ggml_type::GgmlType;
use crate::gguf::GgufError;

/// What loading a model or an adapter, generating or training can fail with.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // each variant's #[error] message says what it means and names its fields
pub enum ModelError {
    #[error("unsupported architecture '{0}' (nomoat runs {supported})", supported = crate::arch::SUPPORTED)]
    UnsupportedArchitecture(String),
    #[error("{0}")]
    Metadata(#[from] GgufError),
    #[error("tensor '{0}' is missing from the model file")]
    MissingTensor(String),
    #[error("tensor '{name}' has shape {got:?}, expected {want:?}")]
    BadShape { name: String, got: Vec<u64>, want: Vec<u64> },
    #[error("tensor '{name}' has type {ty}, which nomoat cannot run")]
    UnsupportedType { name: String, ty: GgmlType },
    #[error("tensor '{name}' holds a non-finite value")]
    NonFinite { name: String },
    #[error("invalid model: {0}")]
    Invalid(String),
    #[error("reading the model file: {0}")]
    Io(String),
    #[error("out of GPU memory loading the model: it needs {needed} bytes ({} MiB) of weights, and {loaded} bytes were on the GPU when {cause}; everything was freed. Try a smaller model or quantization, or close other programs using the GPU", needed >> 20)]
    OutOfMemoryLoading { needed: u64, loaded: u64, cause: GpuError },
    #[error(transparent)]
    Gpu(#[from] GpuError),
    /// Training settings or a model that cannot be trained (they say why).
    #[error("{0}")]
    Training(String),
    #[error("the loss became {loss} at step {step}: training stopped before the factors changed; try a lower learning rate")]
    NonFiniteLoss { step: u32, loss: f64 },
    #[error("the context is full: {needed} tokens needed but the context holds {n_ctx} (use a larger --ctx-size, at most {max})")]
    ContextFull { needed: usize, n_ctx: usize, max: usize },
}

/// Where model bytes come from: a file natively, a `File` or a download in the browser.
#[allow(async_fn_in_trait)]
pub trait ByteSource {
    /// Fills `buf` with the bytes at `offset`; an error says why they could not be read.
    async fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), String>;
}

#[cfg(not(target_arch = "wasm32"))]
impl ByteSource for std::fs::File {
    async fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        use std::io::{Read, Seek, SeekFrom};
        self.seek(SeekFrom::Start(offset)).map_err(|e| e.to_string())?;
        self.read_exact(buf).map_err(|e| e.to_string())
    }
}

impl ByteSource for &[u8] {
    async fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        let end = offset as usize + buf.len();
        let src = self.get(offset as usize..end).ok_or_else(|| format!("read past the end at {end}"))?;
        buf.copy_from_slice(src);
        Ok(())
    }
}
