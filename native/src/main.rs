//! nomoat: run open LLMs (GGUF) on the GPU you have, through WebGPU (Vulkan, Metal, DX12).

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use nomoat_runtime::constrain::{Constrainer, Grammar, Guide};
use nomoat_runtime::device::{Gpu, GpuOptions};
use nomoat_runtime::generate::{self, perplexity, GenerateOptions};
use nomoat_runtime::gguf::Gguf;
use nomoat_runtime::lookup::{Lookup, LookupStats};
use nomoat_runtime::lora::LoraAdapter;
use nomoat_runtime::model::Model;
use nomoat_runtime::ops::KvType;
use nomoat_runtime::sampler::{SamplerConfig, SamplingOverrides};
use nomoat_runtime::session::Session;
use nomoat_runtime::tokenizer::Tokenizer;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Parser)]
#[command(name = "nomoat", version, about = "Open LLMs on your own GPU, natively or in the browser")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

mod chat;
mod finetune;
mod pull;
mod serve;
mod synthetic;

#[derive(Subcommand)]
enum Command {
    /// Interactive chat in the terminal, with the model's chat template
    Chat(chat::ChatArgs),
    /// OpenAI-compatible HTTP server
    Serve(serve::ServeArgs),
    /// Train a LoRA adapter on a JSONL data set (llama.cpp's GGUF adapter format out)
    Finetune(finetune::FinetuneArgs),
    /// Generate text after a raw prompt (no chat template)
    Run {
        #[command(flatten)]
        m: ModelArgs,
        #[arg(short, long)]
        prompt: String,
        /// Tokens to generate at most
        #[arg(short = 'n', long, default_value_t = 128)]
        n_predict: usize,
        #[command(flatten)]
        sampling: SamplingArgs,
        /// Stop string (repeatable)
        #[arg(long)]
        stop: Vec<String>,
        #[command(flatten)]
        constraint: ConstraintArgs,
        /// Print one JSON object {"prompt_tokens", "tokens", "text"} instead of streaming text
        #[arg(long)]
        json: bool,
    },
    /// Token ids of a text, as a JSON list
    Tokenize {
        #[command(flatten)]
        m: ModelArgs,
        #[arg(short, long)]
        prompt: String,
        /// Do not add BOS/EOS even where the model's metadata asks for them
        #[arg(long)]
        no_special: bool,
    },
    /// llama.cpp-style perplexity over non-overlapping windows of a text file
    Perplexity {
        #[command(flatten)]
        m: ModelArgs,
        #[arg(short, long)]
        file: PathBuf,
    },
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
    /// llama-bench-style throughput table: prompt processing (ppN) and generation (tgN) tok/s
    Bench {
        #[command(flatten)]
        m: ModelArgs,
        /// Prompt tokens per pp test
        #[arg(short = 'p', long, default_value_t = 128)]
        n_prompt: usize,
        /// Generated tokens per tg test
        #[arg(short = 'n', long, default_value_t = 128)]
        n_gen: usize,
        /// Tokens already in the KV cache when each test starts (llama-bench's -d): decode
        /// and prefill speed deep into a conversation
        #[arg(short = 'd', long, default_value_t = 0)]
        n_depth: usize,
        /// Repetitions
        #[arg(short = 'r', long, default_value_t = 3)]
        reps: usize,
        #[arg(long)]
        json: bool,
        /// Also time every dispatch with GPU timestamps and print GPU time per kernel for the
        /// pp and tg runs (timing waits for each submission, so tok/s drop a little)
        #[arg(long)]
        profile: bool,
        /// Also measure LoRA training (rank 8 on every projection): forward, backward and the
        /// optimizer step over the pp test's tokens, as a trainN row
        #[arg(long)]
        train: bool,
        /// Also measure decoding under a grammar (--json-schema FILE, --grammar FILE or --regex
        /// RE): greedy, one token a step through the GPU's masked argmax, as a "tgN constrained"
        /// row, with the mask time per token and the compile time
        #[command(flatten)]
        constraint: ConstraintArgs,
        /// Instead of the table: prompt-lookup decoding (--lookup N, else the device's default)
        /// against plain greedy decoding on a code-editing prompt (bench/code-edit.py, a
        /// 300-token function, rewritten with one change), -n tokens each, interleaved over -r
        /// repetitions, the tokens compared
        #[arg(long)]
        code_edit: bool,
        /// With --code-edit: sample at this temperature (llama.cpp's top-k 40, top-p 0.95,
        /// min-p 0.05, a fixed seed) instead of greedy decoding; the two runs then draw
        /// differently, so their tokens are not compared
        #[arg(long, default_value_t = 0.0, requires = "code_edit")]
        temp: f32,
    },
    /// Download a model into the cache: a catalog name (`nomoat pull --list`) or an http(s)
    /// URL; resumes a cut download, checks size and sha256
    Pull {
        /// Catalog name or URL
        #[arg(required_unless_present = "list")]
        model: Option<String>,
        /// List the catalog: names, sizes, licences, and which are in the cache
        #[arg(long)]
        list: bool,
        /// For a URL: the file's sha256 (hex), checked before the download is kept
        #[arg(long)]
        sha256: Option<String>,
    },
    /// Write a GGUF with a real model's shapes and random weights (bench/gpu.sh measures speed
    /// with them where the real files cannot travel)
    #[command(hide = true)]
    Synth {
        /// llama-3.2-1b or llama-3.1-8b
        #[arg(long)]
        shape: String,
        /// q4_0, q4_k_m or q8_0
        #[arg(long = "type")]
        ty: String,
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Describe a GGUF file and the device
    Info {
        #[command(flatten)]
        m: ModelArgs,
    },
}

/// What the reply must match: at most one of a JSON schema, a Lark grammar or a regular
/// expression (runtime/src/constrain.rs).
#[derive(Args, Clone, Debug, Default)]
#[group(multiple = false)]
pub struct ConstraintArgs {
    /// Reply with JSON that fits the JSON schema in FILE
    #[arg(long, value_name = "FILE")]
    pub json_schema: Option<PathBuf>,
    /// Reply with text the grammar in FILE accepts: llama.cpp's GBNF (`root ::= ...`), or a
    /// Lark-style grammar (llguidance's dialect; `start` is the top rule)
    #[arg(long, value_name = "FILE")]
    pub grammar: Option<PathBuf>,
    /// Reply with text the regular expression matches, whole
    #[arg(long, value_name = "RE")]
    pub regex: Option<String>,
}

impl ConstraintArgs {
    /// The grammar the flags name, None without one.
    pub fn grammar(&self) -> Result<Option<Grammar>> {
        let read = |p: &PathBuf| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
        Ok(if let Some(p) = &self.json_schema {
            let schema = serde_json::from_str(&read(p)?).with_context(|| format!("{}: not JSON", p.display()))?;
            Some(Grammar::JsonSchema(schema))
        } else if let Some(p) = &self.grammar {
            // GBNF defines its rules with `::=`, Lark with `:`
            let text = read(p)?;
            Some(if text.contains("::=") { Grammar::Gbnf(text) } else { Grammar::Lark(text) })
        } else {
            self.regex.clone().map(Grammar::Regex)
        })
    }

    /// A fresh guide for one reply under the flags' grammar (compiled for `gguf`'s tokenizer,
    /// made once by the caller through [`ConstraintArgs::constrainer`]).
    pub fn guide(&self, constrainer: Option<&Constrainer>) -> Result<Guide> {
        let (Some(c), Some(g)) = (constrainer, self.grammar()?) else { return Ok(Guide::default()) };
        Ok(Guide::with_constraint(c.compile(&g).context("the grammar cannot be used")?))
    }

    /// The compiler for the model's tokenizer, when a grammar is asked for.
    pub fn constrainer(&self, gguf: &Gguf) -> Result<Option<Constrainer>> {
        if self.grammar()?.is_none() {
            return Ok(None);
        }
        let tokenizer = Arc::new(Tokenizer::from_gguf(gguf)?);
        Ok(Some(Constrainer::new(tokenizer)?))
    }
}

/// Each flag left out takes the model's `general.sampling.*` value when it has one, else
/// llama.cpp's default (see `SamplingOverrides`).
#[derive(Args, Clone, Debug)]
pub struct SamplingArgs {
    /// Temperature, 0 = greedy [default: the model's, else 0.8]
    #[arg(long = "temp")]
    pub temperature: Option<f32>,
    /// [default: the model's, else 40]
    #[arg(long)]
    pub top_k: Option<usize>,
    /// [default: the model's, else 0.95]
    #[arg(long)]
    pub top_p: Option<f32>,
    /// [default: the model's, else 0.05]
    #[arg(long)]
    pub min_p: Option<f32>,
    /// [default: the model's, else 1 (off)]
    #[arg(long)]
    pub repeat_penalty: Option<f32>,
    #[arg(long, default_value_t = 0.0)]
    pub presence_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    pub frequency_penalty: f32,
    /// Random seed (same seed, same output)
    #[arg(long, default_value_t = SamplerConfig::DEFAULT_SEED)]
    pub seed: u64,
}

impl SamplingArgs {
    /// The flags given, over the model's recommendation, over llama.cpp's defaults; says on
    /// stderr (unless `quiet`) which of the model's values are in use and which it had to skip.
    pub fn config(&self, model: &SamplingOverrides, quiet: bool) -> SamplerConfig {
        let model = model.clone();
        let flags = SamplingOverrides {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            ..Default::default()
        };
        if !quiet {
            for note in &model.ignored {
                eprintln!("warning: {note}");
            }
            // the model's values that no flag replaces
            let own = SamplingOverrides {
                temperature: model.temperature.filter(|_| flags.temperature.is_none()),
                top_k: model.top_k.filter(|_| flags.top_k.is_none()),
                top_p: model.top_p.filter(|_| flags.top_p.is_none()),
                min_p: model.min_p.filter(|_| flags.min_p.is_none()),
                repeat_penalty: model.repeat_penalty.filter(|_| flags.repeat_penalty.is_none()),
                ..model.clone()
            };
            if let Some(used) = own.describe() {
                eprintln!("sampling: the model's recommended {used} (flags override)");
            }
        }
        SamplerConfig { presence_penalty: self.presence_penalty, frequency_penalty: self.frequency_penalty, seed: self.seed, ..flags.over(&model.defaults()) }
    }
}

#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// GGUF model file, catalog name (`nomoat pull --list`) or http(s) URL, fetched into the
    /// cache when missing [default: the catalog's default, Qwen2.5-Coder 0.5B Instruct]
    #[arg(short, long)]
    pub model: Option<PathBuf>,
    /// Context size in tokens [default: 2048, or the model's training context if shorter]
    #[arg(short = 'c', long)]
    pub ctx_size: Option<usize>,
    /// KV cache element type: f16, f32, or q8_0 (llama.cpp's blocks of 32 int8s and a scale,
    /// about half of f16's memory per token)
    #[arg(long, default_value = "f16", value_parser = ["f16", "f32", "q8_0"])]
    pub kv: String,
    /// Disable shader-f16 and subgroups (the portable kernels every WebGPU device runs)
    #[arg(long)]
    pub portable: bool,
    /// LoRA adapter (llama.cpp GGUF format) with an optional scale, PATH[:SCALE]; repeatable
    #[arg(long = "lora", value_name = "PATH[:SCALE]")]
    pub lora: Vec<String>,
    /// Use at most this many MiB of GPU memory (weights, KV cache, scratch); loading fails
    /// cleanly beyond it
    #[arg(long, value_name = "MIB")]
    pub max_gpu_memory: Option<u64>,
    /// Prompt-lookup decoding: drafts of up to N tokens copied from the prompt and reply so
    /// far, verified in one pass, in greedy and sampled replies (0: off; not under a grammar, a
    /// logit bias or log-probabilities) [default: the device's choice]
    #[arg(long, value_name = "N", conflicts_with = "no_lookup")]
    pub lookup: Option<usize>,
    /// No prompt-lookup decoding (--lookup 0)
    #[arg(long)]
    pub no_lookup: bool,
}

impl ModelArgs {
    /// The model file: `-m` as a file, or fetched by catalog name or URL, or the default model.
    pub fn path(&self, quiet: bool) -> Result<PathBuf> {
        pull::resolve(self.model.as_deref(), quiet)
    }

    /// Prompt-lookup decoding as `--lookup` / `--no-lookup` ask, else the device's default.
    pub fn lookup(&self, gpu: &Gpu) -> Lookup {
        match (self.no_lookup, self.lookup) {
            (true, _) => Lookup::OFF,
            (false, Some(n)) => Lookup::with_draft(n),
            (false, None) => Lookup::default_for(gpu),
        }
    }
}

pub struct Loaded {
    pub path: PathBuf,
    /// What the model recommends (`catalog::recommended_sampling`), under the user's flags.
    pub sampling: SamplingOverrides,
    pub adapters: Vec<(Arc<LoraAdapter>, f32)>,
    pub tokenizer: Tokenizer,
    pub gguf: Gguf,
    pub gpu: Gpu,
    pub model: Model,
}

pub(crate) fn open_gguf(path: &std::path::Path) -> Result<(Gguf, std::fs::File)> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = f.metadata()?.len();
    let g = Gguf::read_from(&mut f, len).with_context(|| format!("reading {}", path.display()))?;
    Ok((g, f))
}

pub fn load(a: &ModelArgs, quiet: bool) -> Result<Loaded> {
    load_profiled(a, quiet, false)
}

/// `load`, with every dispatch timed when `profile` (see `GpuOptions::profile`).
pub fn load_profiled(a: &ModelArgs, quiet: bool, profile: bool) -> Result<Loaded> {
    let path = a.path(quiet)?;
    let (gguf, mut file) = open_gguf(&path)?;
    let tokenizer = Tokenizer::from_gguf(&gguf).context("building the tokenizer from the GGUF metadata")?;
    let gpu = pollster::block_on(Gpu::new(GpuOptions {
        allow_f16: !a.portable,
        allow_subgroups: !a.portable,
        memory_budget: a.max_gpu_memory.map(|m| m << 20),
        profile,
        ..Default::default()
    }))?;
    let bar = indicatif::ProgressBar::new(0);
    if quiet {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    } else {
        bar.set_style(indicatif::ProgressStyle::with_template("loading {msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec})").unwrap().progress_chars("=> "));
        bar.set_message(path.file_name().unwrap_or_default().to_string_lossy().to_string());
    }
    let mut progress = |done: u64, total: u64| {
        bar.set_length(total);
        bar.set_position(done);
    };
    let model = pollster::block_on(Model::load(&gguf, &gpu, &mut file, &mut progress))?;
    bar.finish_and_clear();
    let mut adapters = Vec::new();
    for spec in &a.lora {
        let (path, scale) = parse_lora_spec(spec)?;
        let (ag, mut af) = open_gguf(&path)?;
        let name = path.file_stem().unwrap_or_default().to_string_lossy().to_string();
        let adapter = pollster::block_on(LoraAdapter::load(&name, &ag, &mut af, &gpu, &model.config, &gguf))?;
        adapters.push((Arc::new(adapter), scale));
    }
    let file_name = path.file_name().unwrap_or_default().to_string_lossy();
    let sampling = nomoat_runtime::catalog::recommended_sampling(&gguf, &file_name, file.metadata()?.len());
    Ok(Loaded { path, sampling, adapters, tokenizer, gguf, gpu, model })
}

/// `PATH[:SCALE]`, the scale defaulting to 1.
pub fn parse_lora_spec(spec: &str) -> Result<(PathBuf, f32)> {
    if let Some((path, scale)) = spec.rsplit_once(':') {
        if let Ok(s) = scale.parse::<f32>() {
            if !s.is_finite() {
                bail!("LoRA scale in '{spec}' must be a finite number");
            }
            return Ok((PathBuf::from(path), s));
        }
    }
    Ok((PathBuf::from(spec), 1.0))
}

/// A session on the loaded model with the command line's adapters active.
impl ModelArgs {
    /// `-c`, else 2048, within the model's training context: a larger `-c` is lowered to it, with
    /// a note on stderr (as `nomoat serve` and the page lower theirs).
    pub fn n_ctx(&self, l: &Loaded) -> usize {
        self.n_ctx_for(l.model.config.n_ctx_train)
    }

    /// `-c`, or the default, for a model trained on `n_ctx_train` tokens: one longer than that
    /// is lowered to it with a note (the CLI, the server and the page all lower it).
    pub fn n_ctx_for(&self, n_ctx_train: usize) -> usize {
        let max = n_ctx_train.max(1);
        match self.ctx_size {
            Some(c) if c > max => {
                eprintln!("note: -c {c} is over the model's training context; using {max}");
                max
            }
            Some(c) => c,
            None => DEFAULT_CTX.min(max),
        }
    }
}

pub const DEFAULT_CTX: usize = 2048;

/// ", lookup: A of D drafted tokens accepted in P passes" where prompt-lookup drafted, else "".
pub fn lookup_note(l: &LookupStats) -> String {
    if l.passes == 0 {
        return String::new();
    }
    format!(", lookup: {} of {} drafted tokens accepted in {} passes", l.accepted, l.drafted, l.passes)
}

pub fn new_session<'m>(l: &'m Loaded, m: &ModelArgs, n_ctx: usize, all_logits: bool) -> Result<Session<'m>> {
    let mut s = pollster::block_on(Session::new(&l.model, &l.gpu, n_ctx, kv_type(m), all_logits))?;
    pollster::block_on(s.set_adapters(l.adapters.clone()))?;
    s.lookup = m.lookup(&l.gpu);
    Ok(s)
}

pub fn kv_type(a: &ModelArgs) -> KvType {
    // clap takes only the names KvType::parse knows
    KvType::parse(&a.kv).unwrap_or_else(|e| panic!("{e}"))
}

fn main() {
    // Without a desktop session (SSH, containers, CI) the Vulkan loader's window-system part
    // prints "error: XDG_RUNTIME_DIR is invalid or not set" although nomoat draws nothing;
    // point it at the temp folder so a user's first run does not start with a false error.
    #[cfg(target_os = "linux")]
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir());
    }
    // llvmpipe (lavapipe, Mesa's CPU Vulkan driver) cuts each dispatch into one equal chunk of
    // workgroups per pool thread, which free threads take in turn: with one thread per core a
    // thread that wakes late holds the whole dispatch up; with two per core the others take
    // its second chunk. SmolLM2 on 2 cores (nomoat bench): 2 threads pp128 131, tg64 23.1 tok/s;
    // 3: 120, 23.8; 4: 150, 27.5; 6: 151, 27.5; 8: 150, 26.0. A trade-off, not a free win:
    // waking more threads costs more on tiny dispatches, and Gemma 3's then 72 one-to-four-row
    // norms a token (36 since rope_kv applies the q/k norms) made its decode 13.6 -> 12.6 tok/s
    // (its prefill 106 -> 116). Measured on 2 cores
    // only. Other drivers ignore the variable; a value the user set is kept. Set before any
    // thread or driver exists.
    if std::env::var_os("LP_NUM_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("LP_NUM_THREADS", (2 * cores).to_string());
    }
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        None => chat::run(chat::ChatArgs::default_model_chat()),
        Some(Command::Chat(a)) => chat::run(a),
        Some(Command::Serve(a)) => serve::run(a),
        Some(Command::Pull { model, list, sha256 }) => {
            if list {
                for e in nomoat_runtime::catalog::entries() {
                    let cached = std::fs::metadata(pull::cached_path(&e.file)).is_ok_and(|m| m.len() == e.size);
                    let mark = if e.default { " (default)" } else { "" };
                    println!(
                        "{:<30} {:>7.0} MB  {:<8} {:<20} {}{mark}",
                        e.name,
                        e.size as f64 / 1e6,
                        e.architecture,
                        e.license,
                        if cached { "in the cache" } else { "" }
                    );
                    println!("    {} {}", e.title, e.about);
                }
                return Ok(());
            }
            let model = model.unwrap_or_default();
            let path = match sha256 {
                Some(h) if model.starts_with("http://") || model.starts_with("https://") => pull::fetch_url(&model, None, Some(&h), false)?,
                Some(_) => bail!("--sha256 is for URLs: catalog models carry their own"),
                None => pull::resolve(Some(std::path::Path::new(&model)), false)?,
            };
            println!("{}", path.display());
            Ok(())
        }
        Some(Command::Synth { shape, ty, output }) => {
            let bytes = synthetic::write(&shape, &ty, &output)?;
            println!("{}: {shape} {ty}, {:.0} MB of weights", output.display(), bytes as f64 / 1e6);
            Ok(())
        }
        Some(Command::Info { m }) => {
            let l = load(&m, false)?;
            let c = &l.model.config;
            println!("device: {}", l.gpu.describe());
            println!(
                "architecture: {} ({} layers, width {}, {} / {} heads of {}, vocabulary {})",
                c.arch_name, c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.head_dim, c.n_vocab
            );
            println!("weights on the GPU: {:.1} MiB", l.model.weight_bytes as f64 / (1 << 20) as f64);
            for (ty, count, bytes) in nomoat_runtime::gguf::tensor_type_summary(&l.gguf) {
                println!("  {ty:<6} {count:>4} tensors {:>8.1} MiB", bytes as f64 / (1 << 20) as f64);
            }
            Ok(())
        }
        Some(Command::Tokenize { m, prompt, no_special }) => {
            let (gguf, _) = open_gguf(&m.path(false)?)?;
            let tok = Tokenizer::from_gguf(&gguf)?;
            println!("{}", serde_json::json!(tok.encode(&prompt, !no_special, true)?));
            Ok(())
        }
        Some(Command::Run { m, prompt, n_predict, sampling, stop, constraint, json }) => {
            // a schema file that cannot be read or parsed fails before the model loads
            constraint.grammar()?;
            let l = load(&m, json)?;
            let constrainer = constraint.constrainer(&l.gguf)?;
            let mut guide = constraint.guide(constrainer.as_ref())?;
            let ids = l.tokenizer.encode(&prompt, true, true)?;
            let n_ctx = m.n_ctx(&l);
            let mut s = new_session(&l, &m, n_ctx, false)?;
            let opts = GenerateOptions { max_tokens: n_predict, sampler: sampling.config(&l.sampling, json), stop, stop_at_eog: true };
            let mut out = std::io::stdout();
            if !json {
                print!("{prompt}");
                out.flush().ok();
            }
            let mut on_text = |piece: &str| {
                if !json {
                    print!("{piece}");
                    out.flush().ok();
                }
                true
            };
            let g = pollster::block_on(s.generate_guided(&l.tokenizer, &ids, &opts, &mut guide, &mut on_text, &|| false, &mut |_| {}))?;
            if json {
                println!("{}", serde_json::json!({"prompt_tokens": ids, "tokens": g.tokens, "text": g.text, "finish_reason": g.finish.as_str()}));
            } else {
                println!();
                eprintln!(
                    "[{} prompt tokens at {:.1} tok/s, {} generated at {:.1} tok/s, {}{}]",
                    g.prompt_tokens,
                    g.prompt_tps(),
                    g.tokens.len(),
                    g.gen_tps(),
                    g.finish.as_str(),
                    lookup_note(&g.lookup)
                );
            }
            Ok(())
        }
        Some(Command::Perplexity { m, file }) => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let l = load(&m, false)?;
            let tokens = l.tokenizer.encode(&text, true, false)?;
            let n_ctx = m.n_ctx(&l);
            let mut s = new_session(&l, &m, n_ctx, true)?;
            let bos = if l.tokenizer.add_bos() { l.tokenizer.bos() } else { None };
            eprintln!("{} tokens, windows of {n_ctx}", tokens.len());
            let p = pollster::block_on(perplexity(&mut s, &tokens, n_ctx, bos))?;
            eprintln!("{} windows, {} scored tokens", p.windows, p.scored_tokens);
            println!("perplexity: {:.4}", p.value);
            Ok(())
        }
        Some(Command::Finetune(a)) => finetune::run(a),
        Some(Command::Bench { m, n_prompt, n_gen, n_depth, reps, json, profile, train, constraint, code_edit, temp }) => {
            if code_edit {
                return bench_code_edit(&m, n_gen, reps, json, temp);
            }
            bench(&m, n_prompt, n_gen, n_depth, reps, json, profile, train, &constraint)
        }
        Some(Command::Logits { m, prompt, ids, top }) => {
            let l = load(&m, true)?;
            let ids = match (ids, prompt) {
                (Some(ids), _) => ids,
                (None, Some(p)) => l.tokenizer.encode(&p, true, true)?,
                (None, None) => bail!("give a prompt with -p or token ids with --ids"),
            };
            if ids.is_empty() {
                bail!("the prompt has no tokens");
            }
            let mut s = new_session(&l, &m, m.n_ctx(&l), false)?;
            pollster::block_on(s.eval(&ids))?;
            let top = pollster::block_on(s.top_k(top))?;
            let top: Vec<_> = top.into_iter().map(|(id, logit)| serde_json::json!({"id": id, "logit": logit})).collect();
            println!("{}", serde_json::json!({"prompt_tokens": ids, "top": top}));
            Ok(())
        }
    }
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (v.len().max(2) - 1) as f64;
    (mean, var.sqrt())
}

/// llama-bench's pp / tg: see `generate::bench_once`, which the browser engine runs too.
/// GB/s of weight bytes the plain f32 matvec kernel streams on this device: a 4096 x 4096
/// matrix (64 MiB, beyond any cache). One untimed submission warms it up (pipelines, paging,
/// clocks), then `reps` submissions of `iters` products give one sample each: their spread is
/// the ceiling's (one run's number once moved by 2x between runs on the same idle machine).
fn plain_matvec_gbs(gpu: &Gpu, iters: usize, reps: usize) -> Result<Vec<f64>> {
    use nomoat_runtime::ggml_type::GgmlType;
    use nomoat_runtime::ops::{GpuMatrix, Recorder};
    const N: usize = 4096;
    let w: Vec<u8> = (0..N * N).flat_map(|i| (((i * 7919) % 1000) as f32 * 1e-3).to_le_bytes()).collect();
    pollster::block_on(async {
        let m = GpuMatrix::upload(gpu, "ceiling w", GgmlType::F32, N as u64, N as u64, &w).await?;
        let x = gpu.upload_f32("ceiling x", &vec![1.0; N]).await?;
        let y = gpu.storage("ceiling y", (N * 4) as u64).await?;
        let mut samples = Vec::new();
        for rep in 0..=reps.max(1) {
            let n = iters.max(1);
            let start = std::time::Instant::now();
            let mut rec = Recorder::new(gpu);
            for _ in 0..n {
                rec.matvec(&m, &x, &y).await?;
            }
            rec.submit()?;
            gpu.wait()?;
            if rep > 0 {
                samples.push(m.bytes() as f64 * n as f64 / start.elapsed().as_secs_f64() / 1e9);
            }
        }
        Ok::<_, nomoat_runtime::device::GpuError>(samples)
    })
    .map_err(Into::into)
}

/// Training tok/s over `ids`: rank-8 adapters on every projection, a step (forward, backward,
/// AdamW) per repetition after one to warm up.
fn bench_train(l: &Loaded, ids: &[u32], reps: usize) -> Result<Vec<f64>> {
    use nomoat_runtime::train::step::{Trainer, TARGETS};
    if ids.len() < 2 {
        bail!("--train needs a prompt of at least 2 tokens (-p)");
    }
    let targets: Vec<&str> = TARGETS.iter().map(|t| t.0).collect();
    let mut t = pollster::block_on(Trainer::new(&l.model, &l.gpu, &targets, 8, 16.0, ids.len() as u32, 0))?;
    let weights = vec![1.0f32; ids.len()];
    let h = |step| nomoat_runtime::reference::AdamW { lr: 1e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, step };
    let mut samples = Vec::new();
    for rep in 0..=reps.max(1) {
        let start = std::time::Instant::now();
        pollster::block_on(t.accumulate(ids, &weights))?;
        pollster::block_on(t.optimizer_step(h(rep as u32 + 1), 1.0 / ids.len() as f32))?;
        if rep > 0 {
            samples.push(ids.len() as f64 / start.elapsed().as_secs_f64());
        }
    }
    Ok(samples)
}

/// What `nomoat bench` measures under a grammar.
struct ConstrainedBench {
    tok_s: Vec<f64>,
    mask_ms_per_token: f64,
    compile_ms: f64,
    /// Tokens the grammar forced (fed without sampling where generation fast-forwards), of all.
    forced_share: f64,
}

/// Greedy decoding of n_gen tokens under `constraint`'s grammar, one token a step (each
/// through the GPU's masked argmax, with the step's mask computed first), as tg measures
/// unconstrained decoding: tokens the grammar forces are stepped too, so the two rows compare
/// the cost per token. When the grammar completes, it starts again (the compile untimed).
fn bench_constrained(l: &Loaded, s: &mut Session<'_>, constraint: &ConstraintArgs, n_gen: usize, depth: &[u32], reps: usize) -> Result<Option<ConstrainedBench>> {
    let Some(c) = constraint.constrainer(&l.gguf)? else { return Ok(None) };
    let grammar = constraint.grammar()?.expect("a constrainer comes with a grammar");
    let mut compile_ms = f64::INFINITY;
    let mut compile = || -> Result<nomoat_runtime::constrain::Constraint> {
        let k = c.compile(&grammar).context("the grammar cannot be used")?;
        compile_ms = compile_ms.min(k.compile_seconds * 1e3);
        Ok(k)
    };
    let (mut tok_s, mut mask_s, mut masks, mut forced, mut all) = (Vec::new(), 0.0, 0usize, 0usize, 0usize);
    for _ in 0..reps.max(1) {
        s.reset();
        pollster::block_on(generate::fill_depth(s, depth))?;
        let mut k = compile()?;
        let mut next = 1u32;
        let t = std::time::Instant::now();
        for _ in 0..n_gen {
            let m0 = std::time::Instant::now();
            let mask = k.mask()?;
            mask_s += m0.elapsed().as_secs_f64();
            masks += 1;
            forced += usize::from(mask.count() == 1);
            all += 1;
            next = pollster::block_on(s.eval_top_k_masked(&[next], 1, &mask.words))?.first().map(|b| b.0).context("no allowed token")?;
            if k.is_end(next) || k.accept(next).is_err() || k.is_done() {
                k = compile()?;
            }
        }
        tok_s.push(n_gen as f64 / t.elapsed().as_secs_f64());
    }
    Ok(Some(ConstrainedBench { tok_s, mask_ms_per_token: mask_s * 1e3 / masks.max(1) as f64, compile_ms, forced_share: forced as f64 / all.max(1) as f64 }))
}

/// The code-editing prompt of `nomoat bench --code-edit`.
const CODE_EDIT: &str = include_str!("../../bench/code-edit.py");

/// `nomoat bench --code-edit`: greedy generation (or sampling at `temp`) after the
/// code-editing prompt (the model's chat template around it), plain and with prompt lookup
/// (`--lookup N`, else the default) in turn, `reps` times each; tok/s of each, their ratio, the
/// acceptance, and (greedy) whether the tokens are the same.
fn bench_code_edit(m: &ModelArgs, n_gen: usize, reps: usize, json: bool, temp: f32) -> Result<()> {
    let l = load(m, json)?;
    let template = nomoat_runtime::chat::ChatTemplate::from_gguf(&l.gguf)?.context("--code-edit needs a model with a chat template")?;
    let ask = format!(
        "Rewrite this function so that the tax is computed after the discount only for customers whose name starts with \"vip\", otherwise before the discount. Output only the complete function.\n\n```python\n{CODE_EDIT}```"
    );
    let text = template.render(&[nomoat_runtime::chat::Message::new("user", &ask)], true)?;
    let prompt = l.tokenizer.encode(&text, false, true)?;
    let n_ctx = (prompt.len() + n_gen + 1).min(l.model.config.n_ctx_train);
    let mut s = new_session(&l, m, n_ctx, false)?;
    let lookup = match m.lookup {
        Some(n) if n > 0 => Lookup::with_draft(n),
        _ => Lookup::default_for(&l.gpu),
    };
    let sampler = if temp > 0.0 { SamplerConfig { temperature: temp, ..SamplerConfig::default() } } else { SamplerConfig::greedy() };
    let greedy = sampler.is_greedy();
    let opts = GenerateOptions { max_tokens: n_gen, sampler, stop: Vec::new(), stop_at_eog: false };
    let run = |s: &mut Session<'_>, lk: Lookup| -> Result<generate::Generation> {
        s.reset();
        s.lookup = lk;
        Ok(pollster::block_on(s.generate(&l.tokenizer, &prompt, &opts, &mut |_| true))?)
    };
    // untimed: every pipeline both build
    run(&mut s, lookup)?;
    let (mut plain, mut fast) = (Vec::new(), Vec::new());
    let mut same = true;
    let mut last = None;
    for _ in 0..reps.max(1) {
        let a = run(&mut s, Lookup::OFF)?;
        let b = run(&mut s, lookup)?;
        same &= !greedy || a.tokens == b.tokens;
        plain.push(a.gen_tps());
        fast.push(b.gen_tps());
        last = Some((a, b));
    }
    let (a, b) = last.expect("one repetition at least");
    let (p, ps) = mean_std(&plain);
    let (f, fs) = mean_std(&fast);
    let st = b.lookup;
    let name = l.path.file_name().unwrap_or_default().to_string_lossy().to_string();
    if json {
        println!(
            "{}",
            serde_json::json!({"model": name, "device": l.gpu.describe(), "prompt_tokens": prompt.len(), "generated": a.tokens.len(), "max_draft": lookup.max_draft,
                "temperature": temp, "plain_tok_s": plain, "lookup_tok_s": fast, "speedup": f / p, "passes": st.passes, "drafted": st.drafted, "accepted": st.accepted,
                "identical": if greedy { serde_json::json!(same) } else { serde_json::Value::Null }})
        );
    } else {
        let how = if greedy { "greedy".to_string() } else { format!("sampled at temperature {temp}") };
        println!("{name} on {}: {} prompt tokens, {} generated ({how}), {} repetitions", l.gpu.describe(), prompt.len(), a.tokens.len(), reps.max(1));
        println!("plain decoding      {p:8.2} ± {ps:.2} tok/s");
        println!("prompt lookup ({:2})  {f:8.2} ± {fs:.2} tok/s   {:.2}x", lookup.max_draft, f / p);
        println!(
            "lookup: {} of {} drafted tokens accepted ({:.0}%) in {} passes; tokens identical to plain: {}",
            st.accepted,
            st.drafted,
            st.acceptance() * 100.0,
            st.passes,
            if !greedy {
                "not compared (sampled)"
            } else if same {
                "yes"
            } else {
                "NO"
            }
        );
    }
    if !same {
        bail!("prompt lookup's tokens differ from plain greedy decoding's");
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn bench(m: &ModelArgs, n_prompt: usize, n_gen: usize, n_depth: usize, reps: usize, json: bool, profile: bool, train: bool, constraint: &ConstraintArgs) -> Result<()> {
    let t_load = std::time::Instant::now();
    let l = load_profiled(m, json, profile)?;
    if profile && !l.gpu.profiling() {
        bail!("--profile needs timestamp queries inside compute passes, which {} does not offer", l.gpu.info.name);
    }
    let load_s = t_load.elapsed().as_secs_f64();
    let c = &l.model.config;
    // room for the depth and the pp or tg run after it, and for the 32-token prompt the time
    // to first token uses
    let n_ctx = n_depth + n_prompt.max(n_gen).max(32) + 1;
    if n_ctx > c.n_ctx_train {
        bail!("depth {n_depth} + pp{n_prompt} / tg{n_gen} needs {n_ctx} tokens of context, over the model's {}", c.n_ctx_train);
    }
    let mut s = new_session(&l, m, n_ctx, false)?;
    let ids = generate::bench_ids(n_prompt, c.n_vocab);
    let depth = generate::bench_ids(n_depth, c.n_vocab);
    let depth = &depth[..n_depth];
    pollster::block_on(generate::bench_warm_up(&mut s, &ids))?;
    if n_depth > 0 {
        // attention over a long cache may use kernels the warm-up did not build: one short
        // untimed run at the depth, so the first timed repetition does not pay for them
        pollster::block_on(generate::bench_once(&mut s, &ids[..n_prompt.min(8)], n_gen.min(2), depth, &mut || {}))?;
    }
    // time to first token: a 32-token prompt from an empty cache to the first sampled id
    let ttft_ms = {
        let prompt = generate::bench_ids(32, c.n_vocab);
        s.reset();
        let t = std::time::Instant::now();
        pollster::block_on(s.eval_top_k(&prompt, 1))?;
        t.elapsed().as_secs_f64() * 1e3
    };
    // the ceiling is sampled before and after the timed runs, so drift during the run shows in its spread
    let mut matvec_samples = plain_matvec_gbs(&l.gpu, 10, 3)?;
    let bytes_per_token = l.model.decode_bytes_per_token();
    // with adapters given, generation is also measured with 0, 1, ... of them active
    let mut rows: Vec<(String, Vec<f64>)> = Vec::new();
    let sweep: Vec<usize> = if l.adapters.is_empty() { vec![0] } else { (0..=l.adapters.len()).collect() };
    for &k in &sweep {
        pollster::block_on(s.set_adapters(l.adapters[..k].to_vec()))?;
        let label = |t: String| {
            let t = if n_depth > 0 { format!("{t} @ d{n_depth}") } else { t };
            if l.adapters.is_empty() {
                t
            } else {
                format!("{t} +{k} lora")
            }
        };
        let mut pp = Vec::new();
        let mut tg = Vec::new();
        for _ in 0..reps.max(1) {
            let run = pollster::block_on(generate::bench_once(&mut s, &ids[..n_prompt], n_gen, depth, &mut || {}))?;
            if n_prompt > 0 {
                pp.push(run.prompt_tps);
            }
            if n_gen > 0 {
                tg.push(run.gen_tps);
            }
        }
        if !pp.is_empty() {
            rows.push((label(format!("pp{n_prompt}")), pp));
        }
        if !tg.is_empty() {
            rows.push((label(format!("tg{n_gen}")), tg));
        }
    }
    matvec_samples.extend(plain_matvec_gbs(&l.gpu, 10, 3)?);
    let (matvec_gbs, matvec_std) = mean_std(&matvec_samples);
    let ceilings: Vec<f64> = matvec_samples.iter().map(|g| g * 1e9 / bytes_per_token as f64).collect();
    let (ceiling, ceiling_std) = mean_std(&ceilings);
    let (ceiling_min, ceiling_max) = ceilings.iter().fold((f64::MAX, 0f64), |(lo, hi), &c| (lo.min(c), hi.max(c)));
    if train {
        rows.push((format!("train{n_prompt}"), bench_train(&l, &ids[..n_prompt], reps)?));
    }
    let constrained = bench_constrained(&l, &mut s, constraint, n_gen, depth, reps)?;
    if let Some(b) = &constrained {
        rows.push((format!("tg{n_gen} constrained"), b.tok_s.clone()));
    }
    // GPU time per kernel: one more pp and one more tg run, each profiled on its own
    let mut profiles = Vec::new();
    if profile {
        for (test, prompt, gen, tokens) in [("pp", &ids[..n_prompt], 0, n_prompt), ("tg", &ids[..0], n_gen, n_gen)] {
            if tokens > 0 {
                // the depth's own prefill is not part of the test
                pollster::block_on(generate::bench_once(&mut s, prompt, gen, depth, &mut || {
                    l.gpu.take_profile();
                }))?;
                profiles.push((format!("{test}{tokens}"), tokens, l.gpu.take_profile()));
            }
        }
    }
    let name = l.path.file_name().unwrap_or_default().to_string_lossy().to_string();
    let size_mib = l.model.weight_bytes as f64 / (1 << 20) as f64;
    let backend = format!("{} ({:?}, {})", l.gpu.info.name, l.gpu.info.backend, l.gpu.variant.label());
    if json {
        let tests: Vec<_> = rows
            .iter()
            .map(|(t, v)| {
                let (mean, std) = mean_std(v);
                serde_json::json!({"test": t, "tok_s_mean": mean, "tok_s_std": std, "samples": v})
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "model": name, "size_mib": size_mib, "backend": backend, "kv": m.kv, "tests": tests,
                "load_s": load_s, "ttft32_ms": ttft_ms, "n_vocab": c.n_vocab,
                "constrained": constrained.as_ref().map(|b| serde_json::json!({"mask_ms_per_token": b.mask_ms_per_token, "compile_ms": b.compile_ms, "forced_share": b.forced_share})),
                "decode_bytes_per_token": bytes_per_token, "matvec_f32_gbs": matvec_gbs, "matvec_f32_gbs_std": matvec_std,
                "matvec_f32_gbs_samples": matvec_samples, "decode_ceiling_tok_s": ceiling, "decode_ceiling_tok_s_std": ceiling_std,
                "kv_bytes_per_token": c.kv_bytes_per_token(kv_type(m)),
                "profile": profiles.iter().map(|(test, tokens, kernels)| serde_json::json!({
                    "test": test, "tokens": tokens,
                    "kernels": kernels.iter().map(|k| serde_json::json!({"kernel": k.kernel, "calls": k.calls, "seconds": k.seconds})).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            })
        );
    } else {
        println!("| model | size | backend | test | t/s |");
        println!("| --- | ---: | --- | ---: | ---: |");
        for (t, v) in &rows {
            let (mean, std) = mean_std(v);
            println!("| {name} | {size_mib:.1} MiB | {backend} | {t} | {mean:.2} ± {std:.2} |");
        }
        println!();
        println!("load {load_s:.2} s · time to first token (32-token prompt) {ttft_ms:.0} ms");
        println!("KV cache ({}): {} bytes per token of context", m.kv, c.kv_bytes_per_token(kv_type(m)));
        println!(
            "decode ceiling {ceiling:.1} ± {ceiling_std:.1} tok/s = {:.1} MB of weights per token ÷ {matvec_gbs:.2} ± {matvec_std:.2} GB/s (plain f32 matvec, {} samples this run, before and after the tests)",
            bytes_per_token as f64 / 1e6,
            matvec_samples.len()
        );
        if let Some((_, tg)) = rows.iter().find(|(t, _)| t.starts_with("tg") && !t.contains("lora")) {
            let tg = mean_std(tg).0;
            println!("tg reaches {:.0}% of the ceiling ({:.0} to {:.0}% across its samples)", 100.0 * tg / ceiling, 100.0 * tg / ceiling_max, 100.0 * tg / ceiling_min);
            if let Some(b) = &constrained {
                println!(
                    "constrained: {:.0}% of unconstrained tg; mask {:.3} ms per token; compile {:.2} ms; {:.0}% of the steps had one allowed token (fed without sampling in generation)",
                    100.0 * mean_std(&b.tok_s).0 / tg,
                    b.mask_ms_per_token,
                    b.compile_ms,
                    100.0 * b.forced_share
                );
            }
        }
        for (test, tokens, kernels) in &profiles {
            let total: f64 = kernels.iter().map(|k| k.seconds).sum();
            println!("\nGPU time per kernel, {test} (timestamps around each dispatch; {:.2} ms per token in all)", total * 1e3 / *tokens as f64);
            println!("| kernel | dispatches per token | ms per token | share |");
            println!("| --- | ---: | ---: | ---: |");
            for k in kernels {
                let per = |v: f64| v / *tokens as f64;
                println!("| {} | {:.1} | {:.3} | {:.1}% |", k.kernel, per(k.calls as f64), per(k.seconds) * 1e3, 100.0 * k.seconds / total);
            }
        }
    }
    Ok(())
}
