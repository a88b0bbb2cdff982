//! nomoat: run open LLMs (GGUF) on the GPU you have, through WebGPU (Vulkan, Metal, DX12).

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use nomoat_runtime::device::{Gpu, GpuOptions};
use nomoat_runtime::gguf::Gguf;
use nomoat_runtime::kernels::KvType;
use nomoat_runtime::model::{Model, Session};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "nomoat", version, about = "Open LLMs on your own GPU, natively or in the browser")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Last-position logits of a prompt, as JSON: {"prompt_tokens": [..], "top": [{"id", "logit"}]}
    Logits {
        #[command(flatten)]
        m: ModelArgs,
        /// Prompt text
        #[arg(short, long, conflicts_with = "ids")]
        prompt: Option<String>,
        /// Token ids instead of text, comma separated
        #[arg(long, value_delimiter = ',')]
        ids: Option<Vec<u32>>,
        #[arg(long, default_value_t = 10)]
        top: u32,
    },
    /// Describe a GGUF file and the device
    Info {
        #[command(flatten)]
        m: ModelArgs,
    },
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// GGUF model file (default: the SmolLM2 135M Instruct test model fetched by set-up)
    #[arg(short, long)]
    model: Option<PathBuf>,
    /// Context size in tokens
    #[arg(short = 'c', long, default_value_t = 2048)]
    ctx_size: usize,
    /// KV cache element type
    #[arg(long, default_value = "f16", value_parser = ["f16", "f32"])]
    kv: String,
    /// Disable shader-f16 and subgroups (the portable kernels every WebGPU device runs)
    #[arg(long)]
    portable: bool,
}

fn default_model() -> PathBuf {
    let cache = std::env::var_os("NOMOAT_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/nomoat"));
    cache.join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

struct Loaded {
    gguf: Gguf,
    gpu: Gpu,
    model: Model,
}

fn open_gguf(path: &PathBuf) -> Result<(Gguf, std::fs::File)> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = f.metadata()?.len();
    let g = Gguf::read_from(&mut f, len).with_context(|| format!("reading {}", path.display()))?;
    Ok((g, f))
}

fn load(a: &ModelArgs, quiet: bool) -> Result<Loaded> {
    let path = a.model.clone().unwrap_or_else(default_model);
    if !path.exists() {
        bail!("model file {} not found (run scripts/setup.sh to fetch the test models, or pass -m)", path.display());
    }
    let (gguf, mut file) = open_gguf(&path)?;
    let gpu = pollster::block_on(Gpu::new(GpuOptions { allow_f16: !a.portable, allow_subgroups: !a.portable, ..Default::default() }))?;
    let bar = indicatif::ProgressBar::new(0);
    if quiet {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    } else {
        bar.set_style(
            indicatif::ProgressStyle::with_template("loading {msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec})")
                .unwrap()
                .progress_chars("=> "),
        );
        bar.set_message(path.file_name().unwrap_or_default().to_string_lossy().to_string());
    }
    let mut progress = |done: u64, total: u64| {
        bar.set_length(total);
        bar.set_position(done);
    };
    let model = pollster::block_on(Model::load(&gguf, &gpu, &mut file, &mut progress))?;
    bar.finish_and_clear();
    Ok(Loaded { gguf, gpu, model })
}

fn kv_type(a: &ModelArgs) -> KvType {
    if a.kv == "f32" {
        KvType::F32
    } else {
        KvType::F16
    }
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        None => {
            bail!("no command given (try `nomoat --help`)");
        }
        Some(Command::Info { m }) => {
            let l = load(&m, false)?;
            let c = &l.model.config;
            println!("device: {}", l.gpu.describe());
            println!("architecture: {} ({} layers, width {}, {} / {} heads of {}, vocabulary {})", c.arch_name, c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.head_dim, c.n_vocab);
            println!("weights on the GPU: {:.1} MiB", l.model.weight_bytes as f64 / (1 << 20) as f64);
            for (ty, count, bytes) in nomoat_runtime::gguf::tensor_type_summary(&l.gguf) {
                println!("  {ty:<6} {count:>4} tensors {:>8.1} MiB", bytes as f64 / (1 << 20) as f64);
            }
            Ok(())
        }
        Some(Command::Logits { m, prompt, ids, top }) => {
            let l = load(&m, true)?;
            let ids = match (ids, prompt) {
                (Some(ids), _) => ids,
                (None, Some(_p)) => bail!("text prompts need the tokenizer (not built yet); pass --ids"),
                (None, None) => bail!("give a prompt with -p or token ids with --ids"),
            };
            if ids.is_empty() {
                bail!("the prompt has no tokens");
            }
            let mut s = pollster::block_on(Session::new(&l.model, &l.gpu, m.ctx_size.min(l.model.config.n_ctx_train), kv_type(&m), false))?;
            pollster::block_on(s.eval(&ids))?;
            let top = pollster::block_on(s.top_k(top))?;
            let top: Vec<_> = top.into_iter().map(|(id, logit)| serde_json::json!({"id": id, "logit": logit})).collect();
            println!("{}", serde_json::json!({"prompt_tokens": ids, "top": top}));
            Ok(())
        }
    }
}
