//! Loads a GGUF model onto the GPU and streams one reply, with nothing but nomoat-runtime's
//! public API:
//!
//! ```sh
//! cargo run --release -p nomoat-runtime --example generate -- MODEL.gguf "What is the capital of France?" [MAX_TOKENS]
//! ```
//!
//! The prompt goes through the model's chat template when it has one (as a user message), else
//! it is continued as raw text. Sampling takes the values the model file recommends, else
//! llama.cpp's defaults. `WGPU_BACKEND` (vulkan, metal, dx12) chooses the graphics API.

use std::error::Error;
use std::io::Write;

use nomoat_runtime::chat::{ChatTemplate, Message};
use nomoat_runtime::device::{Gpu, GpuOptions};
use nomoat_runtime::generate::GenerateOptions;
use nomoat_runtime::gguf::Gguf;
use nomoat_runtime::model::Model;
use nomoat_runtime::sampler::SamplingOverrides;
use nomoat_runtime::session::Session;
use nomoat_runtime::tokenizer::Tokenizer;
use nomoat_runtime::KvType;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (path, prompt) = match args.as_slice() {
        [path, prompt] | [path, prompt, _] => (path, prompt),
        _ => {
            eprintln!("usage: generate MODEL.gguf PROMPT [MAX_TOKENS]");
            std::process::exit(2);
        }
    };
    let max_tokens = match args.get(2).map(|n| n.parse::<usize>()) {
        None => 128,
        Some(Ok(n)) if n > 0 => n,
        Some(_) => {
            eprintln!("MAX_TOKENS must be a whole number above 0, not {:?}", args[2]);
            std::process::exit(2);
        }
    };
    if let Err(e) = pollster::block_on(generate(path, prompt, max_tokens)) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

async fn generate(path: &str, prompt: &str, max_tokens: usize) -> Result<(), Box<dyn Error>> {
    // The header (metadata and tensor table) only: the weights are read as they are uploaded.
    let mut file = std::fs::File::open(path).map_err(|e| format!("opening {path}: {e}"))?;
    let len = file.metadata()?.len();
    let gguf = Gguf::read_from(&mut file, len)?;
    let tokenizer = Tokenizer::from_gguf(&gguf)?;
    let template = ChatTemplate::from_gguf(&gguf)?;

    let gpu = Gpu::new(GpuOptions::default()).await?;
    eprintln!("device: {}", gpu.describe());
    let mut shown = None; // MiB uploaded, printed when it changes
    let mut progress = |done: u64, total: u64| {
        if shown != Some(done >> 20) {
            shown = Some(done >> 20);
            eprint!("\rloading: {}/{} MiB", done >> 20, total >> 20);
        }
    };
    let model = Model::load(&gguf, &gpu, &mut file, &mut progress).await?;
    eprintln!();
    let n_ctx = model.config.n_ctx_train.clamp(1, 2048);
    let mut session = Session::new(&model, &gpu, n_ctx, KvType::F16, false).await?;

    // A rendered template carries its own BOS; raw text gets the tokenizer's.
    let ids = match &template {
        Some(t) => tokenizer.encode(&t.render(&[Message::new("user", prompt)], true)?, false, true)?,
        None => tokenizer.encode(prompt, true, true)?,
    };
    let opts = GenerateOptions { max_tokens, sampler: SamplingOverrides::from_gguf(&gguf).defaults(), ..Default::default() };
    let mut out = std::io::stdout();
    let reply = session
        .generate(&tokenizer, &ids, &opts, &mut |piece| {
            print!("{piece}");
            out.flush().is_ok()
        })
        .await?;
    println!();
    eprintln!(
        "{} prompt tokens at {:.1} tokens/s, {} generated at {:.1} tokens/s, finish: {}",
        reply.prompt_tokens,
        reply.prompt_tps(),
        reply.tokens.len(),
        reply.gen_tps(),
        reply.finish.as_str()
    );
    Ok(())
}
