//! `nomoat chat`: interactive terminal chat with the model's own chat template.
//!
//! Each turn renders the whole conversation and hands it to the session, which re-evaluates
//! only what differs from its KV cache (normally just the new user message). Ctrl-C stops the
//! reply being written, not the program; `/reset` starts over, `/exit` (or Ctrl-D) quits. A line
//! ending in `\` continues on the next one, and `"""` opens and closes a multi-line block.

use crate::{load, ConstraintArgs, ModelArgs, SamplingArgs};
use anyhow::{bail, Context, Result};
use clap::Args;
use nomoat_runtime::chat::{ChatTemplate, Message};
use nomoat_runtime::error::ModelError;
use nomoat_runtime::generate::GenerateOptions;
use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Args, Clone, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub m: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// System prompt
    #[arg(long)]
    pub system: Option<String>,
    /// Longest reply in tokens
    #[arg(short = 'n', long, default_value_t = 512)]
    pub n_predict: usize,
    /// Every reply fits this (a JSON schema, a grammar or a regular expression)
    #[command(flatten)]
    pub constraint: ConstraintArgs,
}

impl ChatArgs {
    /// `nomoat` with no arguments: chat with the default test model.
    pub fn default_model_chat() -> ChatArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct Only {
            #[command(flatten)]
            a: ChatArgs,
        }
        Only::parse_from(["nomoat"]).a
    }
}

enum Input {
    Message(String),
    Reset,
    Exit,
}

/// Read one user turn: a line, a `\`-continued run of lines, or a `"""` block.
fn read_input(stdin: &mut impl BufRead, interrupted: &AtomicBool) -> Result<Input> {
    let mut text = String::new();
    let mut in_block = false;
    loop {
        let mut line = String::new();
        interrupted.store(false, Ordering::SeqCst);
        if stdin.read_line(&mut line)? == 0 {
            return Ok(Input::Exit);
        }
        let line = line.trim_end_matches(['\n', '\r']);
        if text.is_empty() && !in_block {
            match line.trim() {
                "/exit" | "/quit" | "/bye" => return Ok(Input::Exit),
                "/reset" | "/clear" => return Ok(Input::Reset),
                "" => {
                    print!("> ");
                    std::io::stdout().flush().ok();
                    continue;
                }
                _ => {}
            }
        }
        if line.trim() == "\"\"\"" {
            if in_block {
                return Ok(Input::Message(text));
            }
            in_block = true;
            continue;
        }
        if let Some(start) = line.strip_prefix("\"\"\"").filter(|_| !in_block) {
            in_block = true;
            text.push_str(start);
            text.push('\n');
            continue;
        }
        if in_block {
            if let Some(end) = line.strip_suffix("\"\"\"") {
                text.push_str(end);
                return Ok(Input::Message(text));
            }
            text.push_str(line);
            text.push('\n');
        } else if let Some(cont) = line.strip_suffix('\\') {
            text.push_str(cont);
            text.push('\n');
        } else {
            text.push_str(line);
            return Ok(Input::Message(text));
        }
        print!(". ");
        std::io::stdout().flush().ok();
    }
}

pub fn run(a: ChatArgs) -> Result<()> {
    // a schema file that cannot be read or parsed fails before the model loads
    a.constraint.grammar()?;
    let l = load(&a.m, false)?;
    let constrainer = a.constraint.constrainer(&l.gguf)?;
    let template = ChatTemplate::from_gguf(&l.gguf)?.context("this model has no chat template (a base model?): use `nomoat run -p TEXT` for raw prompts")?;
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst)).context("installing the Ctrl-C handler")?;
    }
    let n_ctx = a.m.n_ctx(&l);
    let mut session = crate::new_session(&l, &a.m, n_ctx, false)?;
    let opts = GenerateOptions { max_tokens: a.n_predict, sampler: a.sampling.config(&l.sampling, false), stop: Vec::new(), stop_at_eog: true };
    opts.sampler.validate().map_err(anyhow::Error::msg)?;
    let system: Vec<Message> = a.system.iter().map(|s| Message { role: "system".into(), content: s.clone() }).collect();
    let mut history: Vec<Message> = Vec::new();
    eprintln!("{} on {}", l.path.display(), l.gpu.describe());
    eprintln!("Chat away. Ctrl-C stops a reply; /reset starts over; /exit or Ctrl-D quits; end a line with \\ or use \"\"\" for several lines.");
    let mut stdin = std::io::stdin().lock();
    loop {
        print!("> ");
        std::io::stdout().flush().ok();
        let text = match read_input(&mut stdin, &interrupted)? {
            Input::Exit => return Ok(()),
            Input::Reset => {
                history.clear();
                session.reset();
                println!("(conversation reset)");
                continue;
            }
            Input::Message(t) => t,
        };
        history.push(Message { role: "user".into(), content: text });
        // Keep room for a reply: drop the oldest exchanges until the prompt fits.
        let reserve = a.n_predict.min(n_ctx / 4).max(1);
        let prompt = loop {
            let all: Vec<Message> = system.iter().chain(&history).cloned().collect();
            let rendered = template.render(&all, true)?;
            let ids = l.tokenizer.encode(&rendered, false, true)?;
            if ids.len() + reserve <= n_ctx {
                break Some(ids);
            }
            if history.len() <= 1 {
                println!(
                    "(that message is {} tokens; the context holds {n_ctx}, with {reserve} kept for the reply — try a shorter one or a larger --ctx-size)",
                    ids.len()
                );
                history.pop();
                break None;
            }
            let dropped = history.iter().skip(1).position(|m| m.role == "user").map(|i| i + 1).unwrap_or(history.len() - 1);
            history.drain(..dropped);
            println!("(the conversation outgrew the {n_ctx}-token context: dropped the oldest exchange)");
        };
        let Some(prompt) = prompt else { continue };
        let mut out = std::io::stdout();
        let mut guide = a.constraint.guide(constrainer.as_ref())?;
        let mut on_text = |piece: &str| {
            print!("{piece}");
            out.flush().ok();
            !interrupted.load(Ordering::SeqCst)
        };
        let result = pollster::block_on(session.generate_guided(&l.tokenizer, &prompt, &opts, &mut guide, &mut on_text, &|| false, &mut |_| {}));
        println!();
        match result {
            Ok(g) => {
                eprintln!(
                    "[{} prompt tokens ({} reused) at {:.1} tok/s, {} generated at {:.1} tok/s{}]",
                    g.prompt_tokens,
                    g.reused_tokens,
                    g.prompt_tps(),
                    g.tokens.len(),
                    g.gen_tps(),
                    match g.finish {
                        nomoat_runtime::generate::FinishReason::Cancelled => ", stopped".to_string(),
                        // a reply that ran to the limit (a loop, or just long) is said to be cut
                        nomoat_runtime::generate::FinishReason::Length => format!(", cut at the {}-token limit (-n)", a.n_predict),
                        _ => String::new(),
                    }
                );
                history.push(Message { role: "assistant".into(), content: g.text });
            }
            Err(ModelError::ContextFull { .. }) => {
                println!("(the context filled up mid-reply; the next turn drops the oldest exchange)");
            }
            Err(e) => bail!(e),
        }
    }
}
