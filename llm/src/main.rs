//! `pqcache-llm`: run Gemma-3 from a GGUF on the CPU, its global layers through pqcache.
//!
//! ```text
//! pqcache-llm generate --model GGUF --prompt TEXT [--max-new N] [--attention dense|SPEC] [--budget R] [--json]
//! pqcache-llm dump --model GGUF --text F --tokens N --layers 5,11,17 --out DIR
//! ```

use clap::{Args, Parser, Subcommand};
use half::f16;
use pqcache::io::npy::{self, NpyData};
use pqcache_llm::context::Access;
use pqcache_llm::model::{argmax, nll};
use pqcache_llm::tokenizer::GemmaTokenizer;
use pqcache_llm::{
    Backend, Gemma3, LlmError, Logits, Precision, PrefillOptions, Result, Session, Stop,
};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Parser)]
#[command(
    name = "pqcache-llm",
    version,
    about = "Gemma-3 on the CPU; global attention through pqcache retrieval"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Greedy generation: prefill the prompt, decode token by token through the backend.
    Generate(GenerateArgs),
    /// Prefill a document once and save it as a context file that `ask` reopens.
    Prefill(PrefillArgs),
    /// Open a saved context (zero-copy; the file is never modified), decode a question and
    /// answer it through the backend.
    Ask(AskArgs),
    /// Post-RoPE Q, K, V of chosen layers, in the layout of pqcache's attention dumps.
    Dump(DumpArgs),
    /// Token ids of a text (BOS first) as a JSON list: prompts for --ids, or for a peer.
    Tokenize(TokenizeArgs),
    /// Teacher-forced perplexity, KL(dense || method) and top-1 agreement per method and
    /// budget: a dense prefill of the first tokens, then every later token decoded.
    Perplexity(PerplexityArgs),
    /// Passkey retrieval: a key hidden at a depth of a haystack, the question and the answer
    /// decoded through each method; accuracy per method, budget, length and depth.
    Passkey(PasskeyArgs),
}

#[derive(Args)]
struct PasskeyArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The haystack text (repeated if shorter than the longest length).
    #[arg(long)]
    haystack: PathBuf,
    /// Prompt lengths in tokens, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "4096")]
    lengths: Vec<usize>,
    /// Needle depths in [0, 1], comma separated.
    #[arg(long, value_delimiter = ',', default_value = "0.1,0.5,0.9")]
    depths: Vec<f64>,
    /// Trials (keys) per cell.
    #[arg(long, default_value_t = 1)]
    trials: usize,
    /// Methods, comma separated (`dense` included if named).
    #[arg(long, value_delimiter = ',', default_value = "dense,fastscan:64x4")]
    attention: Vec<String>,
    /// Budget ratios of the retrieval methods, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "0.1")]
    budgets: Vec<f64>,
    /// Seed of the keys.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// One JSON object (`rows`) instead of a table.
    #[arg(long)]
    json: bool,
}

/// A token sequence given as text or as ids.
#[derive(Args)]
struct TextInput {
    /// A UTF-8 text (its first `8 * tokens` characters are tokenized after a BOS).
    #[arg(long, conflicts_with = "ids")]
    text: Option<PathBuf>,
    /// Token ids (.npy or .json).
    #[arg(long)]
    ids: Option<PathBuf>,
}

#[derive(Args)]
struct PerplexityArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    input: TextInput,
    /// Tokens in all (prefill + decoded).
    #[arg(long, default_value_t = 4096)]
    tokens: usize,
    /// Tokens prefilled densely before decoding starts.
    #[arg(long, default_value_t = 2048)]
    prefill: usize,
    /// Methods, comma separated (dense runs once, as the reference).
    #[arg(long, value_delimiter = ',', default_value = "exact,fastscan:64x4")]
    attention: Vec<String>,
    /// Budget ratios, comma separated: every method runs at each.
    #[arg(long, value_delimiter = ',', default_value = "0.1")]
    budgets: Vec<f64>,
    /// One JSON object (`rows`) instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct TokenizeArgs {
    /// The GGUF file whose vocabulary to use.
    #[arg(long)]
    model: PathBuf,
    /// A UTF-8 text.
    #[arg(long)]
    text: PathBuf,
    /// Keep the first N ids at most.
    #[arg(long)]
    tokens: Option<usize>,
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// The GGUF file (scripts/fetch-gemma.sh prints its path).
    #[arg(long)]
    model: PathBuf,
    /// Weights: mixed (quantized for decode, f32 for prefill batches), quantized, f32.
    #[arg(long, default_value = "mixed")]
    precision: Precision,
    /// Prefill chunk in tokens (bounds the prefill's memory).
    #[arg(long, default_value_t = 512)]
    chunk: usize,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt text (a BOS is prepended).
    #[arg(long, conflicts_with_all = ["prompt_file", "ids"])]
    prompt: Option<String>,
    /// A file holding the prompt text.
    #[arg(long, conflicts_with = "ids")]
    prompt_file: Option<PathBuf>,
    /// The prompt as token ids: a .npy (int) or .json list.
    #[arg(long)]
    ids: Option<PathBuf>,
    /// A question decoded token by token through the backend after the prefilled prompt
    /// (what `ask` does on a saved context of the prompt).
    #[arg(long)]
    question: Option<String>,
    /// Tokens to generate at most (stops early at end of sequence).
    #[arg(long, default_value_t = 64)]
    max_new: usize,
    /// Global-layer attention during decode: dense, or a selector (fastscan:64x4, exact,
    /// window, random, quest:16, pq:2x6, fastscan:128x4:rerank4, ...).
    #[arg(long, default_value = "dense")]
    attention: String,
    /// Fraction of the context a retrieval step attends to.
    #[arg(long, default_value_t = 0.1)]
    budget: f64,
    /// One JSON object instead of streamed text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct PrefillArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The document, a UTF-8 text (a BOS is prepended).
    #[arg(long, conflicts_with = "ids")]
    text: Option<PathBuf>,
    /// The document as token ids: a .npy (int) or .json list.
    #[arg(long)]
    ids: Option<PathBuf>,
    /// Keep the first N tokens at most (default: all; past the model's context is an error).
    #[arg(long)]
    tokens: Option<usize>,
    /// The selector whose indexes are trained and saved, and the default of `ask`.
    #[arg(long, default_value = "fastscan:64x4")]
    attention: String,
    /// Fraction of the context a retrieval step attends to (the default of `ask`).
    #[arg(long, default_value_t = 0.1)]
    budget: f64,
    /// The context file to write.
    #[arg(long)]
    out: PathBuf,
    /// One JSON object instead of a line.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct AskArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The context file (`prefill --out`).
    #[arg(long)]
    context: PathBuf,
    /// The question, decoded token by token after the document ("" continues the document).
    #[arg(long, conflicts_with = "prompt_file")]
    prompt: Option<String>,
    /// A file holding the question.
    #[arg(long)]
    prompt_file: Option<PathBuf>,
    /// Tokens to generate at most (stops early at end of sequence).
    #[arg(long, default_value_t = 64)]
    max_new: usize,
    /// Global-layer attention (default: as saved). `dense`, the saved selector (its indexes
    /// kept) or another one (trained anew on open: a read of every key).
    #[arg(long)]
    attention: Option<String>,
    /// Budget ratio (default: as saved).
    #[arg(long)]
    budget: Option<f64>,
    /// Check every section's checksum first (a read of the whole file).
    #[arg(long)]
    verify: bool,
    /// Read the whole context ahead on open (in the background): the quickest first token
    /// from a cold page cache when the file fits in memory. Without it, only the pages the
    /// steps select are read (a context larger than memory).
    #[arg(long)]
    prefetch: bool,
    /// One JSON object (with open_ms and time_to_first_token_ms) instead of streamed text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct DumpArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    input: TextInput,
    /// Tokens to run.
    #[arg(long, default_value_t = 2048)]
    tokens: usize,
    /// Layers to keep, comma separated (default: the global ones).
    #[arg(long, value_delimiter = ',')]
    layers: Vec<usize>,
    /// Output folder (q.npy, k.npy, v.npy, ids.npy, meta.json).
    #[arg(long)]
    out: PathBuf,
    /// Skip the next-token NLL in meta.json (the output head over every position is most
    /// of a dump's time).
    #[arg(long)]
    no_nll: bool,
}

use pqcache::cli::out;

fn read_ids(path: &Path) -> Result<Vec<u32>> {
    let bad = |reason: String| LlmError::InvalidArgument(format!("{}: {reason}", path.display()));
    let values: Vec<i64> = if path.extension().is_some_and(|e| e == "json") {
        let text = read_text(path)?;
        serde_json::from_str(&text).map_err(|e| bad(format!("not a JSON list of integers: {e}")))?
    } else {
        match npy::read(path)?.data {
            NpyData::I64(v) => v,
            _ => return Err(bad("expected an integer .npy".into())),
        }
    };
    values
        .into_iter()
        .map(|v| u32::try_from(v).map_err(|_| bad(format!("token id {v} out of range"))))
        .collect()
}

fn read_text(path: &Path) -> Result<String> {
    let io = |source| LlmError::Io {
        path: path.into(),
        source,
    };
    let bytes = pqcache::io::read_regular(path).map_err(io)?;
    String::from_utf8(bytes).map_err(|e| {
        io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not UTF-8 text: {e}"),
        ))
    })
}

fn load(m: &ModelArgs) -> Result<Gemma3> {
    let t = Instant::now();
    let model = Gemma3::load(&m.model, m.precision)?;
    eprintln!(
        "loaded {} ({} layers, {} global) in {:.1} s",
        m.model.display(),
        model.cfg.layers,
        model.global_layers().len(),
        t.elapsed().as_secs_f64()
    );
    Ok(model)
}

/// A progress bar on a terminal, for prompts long enough to wait on.
fn progress_bar(total: usize) -> Option<indicatif::ProgressBar> {
    (std::io::stderr().is_terminal() && total >= 2048).then(|| {
        let pb = indicatif::ProgressBar::new(total as u64);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "prefill {bar:40} {pos}/{len} tokens ({per_sec}, eta {eta})",
            )
            .expect("static template"),
        );
        pb
    })
}

/// This process's page faults and bytes read from storage so far (Linux `/proc/self`;
/// zeros elsewhere): what opening and decoding a mapped context costs in I/O.
#[derive(Clone, Copy, Default)]
struct IoCounters {
    minor_faults: u64,
    major_faults: u64,
    read_bytes: u64,
}

impl IoCounters {
    fn now() -> IoCounters {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        // Fields after the parenthesised command name: state is field 3, minflt 10, majflt 12.
        let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let field = |n: usize| -> u64 {
            after
                .split_whitespace()
                .nth(n - 3)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        let io = std::fs::read_to_string("/proc/self/io").unwrap_or_default();
        let read_bytes = io
            .lines()
            .find_map(|l| l.strip_prefix("read_bytes: "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        IoCounters {
            minor_faults: field(10),
            major_faults: field(12),
            read_bytes,
        }
    }

    /// `self - earlier`, divided by `per`.
    fn since(self, earlier: IoCounters, per: usize) -> serde_json::Value {
        let per = per.max(1) as f64;
        serde_json::json!({
            "minor_faults": (self.minor_faults - earlier.minor_faults) as f64 / per,
            "major_faults": (self.major_faults - earlier.major_faults) as f64 / per,
            "read_bytes": (self.read_bytes - earlier.read_bytes) as f64 / per,
        })
    }
}

/// Prints new tokens as whole characters: decodes what is new, holds back an incomplete
/// byte run.
struct Stream<'t> {
    tok: &'t GemmaTokenizer,
    ids: Vec<u32>,
    /// `ids[prefix..read]` were shown last time; text is decoded from `prefix` on, so that
    /// a token's text is what it adds to the one before it (spaces and merged bytes right),
    /// and each step decodes a few tokens, not all of them (a 30K-token generation decoded
    /// its whole text at every token).
    prefix: usize,
    read: usize,
    quiet: bool,
}

impl<'t> Stream<'t> {
    fn new(tok: &'t GemmaTokenizer, quiet: bool) -> Stream<'t> {
        Stream {
            tok,
            ids: Vec::new(),
            prefix: 0,
            read: 0,
            quiet,
        }
    }

    /// Shows the text `id` adds, once it is whole (a token that ends inside a UTF-8
    /// character waits for the next).
    fn push(&mut self, id: u32) -> Result<()> {
        self.ids.push(id);
        if !self.quiet {
            let shown = self.tok.decode(&self.ids[self.prefix..self.read])?;
            let text = self.tok.decode(&self.ids[self.prefix..])?;
            if !text.ends_with('\u{fffd}') && text.len() > shown.len() {
                // The decoder (`'▁'` to space, byte fallback, fuse) concatenates the pieces'
                // texts, so the text from `prefix` on starts with what was shown of it.
                if let Some(new) = text.strip_prefix(shown.as_str()) {
                    out(new);
                }
                self.prefix = self.read;
                self.read = self.ids.len();
            }
        }
        Ok(())
    }
}

/// A line on stderr when a generation stopped because the context was full (it is not an
/// error: the tokens generated are the answer).
fn context_full_note(model: &Gemma3, stop: Stop) {
    if stop == Stop::ContextFull {
        eprintln!(
            "stopped: the model's context of {} positions is full",
            model.cfg.context_length
        );
    }
}

/// A document or prompt: a text (BOS first), a text file or ids.
fn prompt_ids(
    model: &Gemma3,
    text: Option<&str>,
    file: Option<&Path>,
    ids: Option<&Path>,
) -> Result<Vec<u32>> {
    match (text, file, ids) {
        (Some(p), _, _) => model.tokenizer.encode_prompt(p),
        (_, Some(f), _) => model.tokenizer.encode_prompt(&read_text(f)?),
        (_, _, Some(f)) => read_ids(f),
        _ => Err(LlmError::InvalidArgument(
            "give a text or ids (--prompt, --prompt-file, --text or --ids)".into(),
        )),
    }
}

/// Prefills `prompt` with a progress bar on a terminal.
fn prefill_with_progress(s: &mut Session<'_>, prompt: &[u32], chunk: usize) -> Result<Vec<f32>> {
    let pb = progress_bar(prompt.len());
    let mut tick = |done: usize, _: usize| {
        if let Some(pb) = &pb {
            pb.set_position(done as u64);
        }
    };
    let logits = s.prefill(
        prompt,
        PrefillOptions {
            chunk,
            logits: Logits::Last,
            progress: Some(&mut tick),
        },
    )?;
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    Ok(logits)
}

fn generate(a: &GenerateArgs) -> Result<()> {
    let backend = Backend::parse(&a.attention, a.budget)?;
    let model = load(&a.model)?;
    let prompt = prompt_ids(
        &model,
        a.prompt.as_deref(),
        a.prompt_file.as_deref(),
        a.ids.as_deref(),
    )?;
    let question = match &a.question {
        Some(q) => model.tokenizer.encode(q)?,
        None => Vec::new(),
    };
    let t0 = Instant::now();
    let mut session = Session::new(&model, backend.clone())?;
    let logits = prefill_with_progress(&mut session, &prompt, a.model.chunk)?;
    let mut stream = Stream::new(&model.tokenizer, a.json);
    let mut first: Option<f64> = None;
    let generated = session.continue_greedy(logits, &question, a.max_new, |t| {
        first.get_or_insert_with(|| t0.elapsed().as_secs_f64() * 1e3);
        stream.push(t)
    })?;
    let new_ids = &generated.ids;
    let p = session.profile();
    let new_text = model.tokenizer.decode(new_ids)?;
    if a.json {
        let v = serde_json::json!({
            "new_ids": new_ids,
            "new_text": new_text,
            "stop": generated.stop.name(),
            "prompt_tokens": prompt.len(),
            "question_tokens": question.len(),
            "time_to_first_token_ms": first,
            "prefill_tokens_per_s": p.prefill.tokens_per_s(),
            "prefill_s": p.prefill.total.as_secs_f64(),
            "decode_tokens_per_s": p.decode.tokens_per_s(),
            "attention": backend.name(),
            "budget": match backend { Backend::Dense => 1.0, _ => a.budget },
            "attended_fraction": p.attended_fraction(),
            "prefill_ms_per_token": p.prefill.ms_per_token_json(),
            "decode_ms_per_token": p.decode.ms_per_token_json(),
        });
        out(&format!("{v}\n"));
    } else {
        out("\n");
        context_full_note(&model, generated.stop);
        eprintln!(
            "prompt {} tokens: prefill {:.1} tokens/s; decode {} tokens: {:.2} tokens/s ({}, attended {:.1} % of the context)",
            prompt.len(),
            p.prefill.tokens_per_s(),
            p.decode.tokens,
            p.decode.tokens_per_s(),
            backend.name(),
            100.0 * p.attended_fraction()
        );
    }
    Ok(())
}

fn prefill(a: &PrefillArgs) -> Result<()> {
    let backend = Backend::parse(&a.attention, a.budget)?;
    let model = load(&a.model)?;
    let mut ids = prompt_ids(&model, None, a.text.as_deref(), a.ids.as_deref())?;
    if let Some(n) = a.tokens {
        ids.truncate(n);
    }
    let mut session = Session::new(&model, backend.clone())?;
    let logits = prefill_with_progress(&mut session, &ids, a.model.chunk)?;
    let t = Instant::now();
    session.save(&a.out, &logits)?;
    let save_s = t.elapsed().as_secs_f64();
    let bytes = std::fs::metadata(&a.out)
        .map_err(|source| LlmError::Io {
            path: a.out.clone(),
            source,
        })?
        .len();
    let c = &model.cfg;
    // The f16 keys and values of the global layers: what the file holds beyond indexes.
    let kv_f16 = ids.len() * model.global_layers().len() * c.kv_heads * c.head_dim * 2 * 2;
    let p = session.profile();
    if a.json {
        let v = serde_json::json!({
            "tokens": ids.len(),
            "attention": backend.name(),
            "prefill_s": p.prefill.total.as_secs_f64(),
            "prefill_tokens_per_s": p.prefill.tokens_per_s(),
            "save_s": save_s,
            "file_bytes": bytes,
            "bytes_per_token": bytes as f64 / ids.len() as f64,
            "global_kv_f16_bytes": kv_f16,
        });
        out(&format!("{v}\n"));
    } else {
        eprintln!(
            "prefilled {} tokens in {:.1} s ({:.0} tokens/s), saved {} ({:.1} MB, {:.0} bytes per token; the global layers' f16 KV is {:.1} MB) in {:.2} s",
            ids.len(),
            p.prefill.total.as_secs_f64(),
            p.prefill.tokens_per_s(),
            a.out.display(),
            bytes as f64 / 1e6,
            bytes as f64 / ids.len() as f64,
            kv_f16 as f64 / 1e6,
            save_s
        );
    }
    Ok(())
}

fn ask(a: &AskArgs) -> Result<()> {
    let backend = match &a.attention {
        Some(spec) => Some(Backend::parse(spec, a.budget.unwrap_or(0.1))?),
        None => None,
    };
    let t = Instant::now();
    // `ask` only decodes (one row at a time: quantized weights under `mixed` too), so the
    // f32 copies `mixed` keeps for prefill batches are not loaded.
    let model = load(&ModelArgs {
        precision: match a.model.precision {
            Precision::Mixed => Precision::Quantized,
            p => p,
        },
        ..a.model.clone()
    })?;
    // The model's identity, once per load (a context must match it).
    model.digest()?;
    let load_ms = t.elapsed().as_secs_f64() * 1e3;
    let question = match (&a.prompt, &a.prompt_file) {
        (Some(q), _) => model.tokenizer.encode(q)?,
        (_, Some(f)) => model.tokenizer.encode(&read_text(f)?)?,
        _ => {
            return Err(LlmError::InvalidArgument(
                "give --prompt or --prompt-file (\"\" continues the document)".into(),
            ))
        }
    };
    let io0 = IoCounters::now();
    let t0 = Instant::now();
    if a.verify {
        pqcache::io::file::verify(&a.context).map_err(|source| LlmError::ContextFile {
            path: a.context.clone(),
            source,
        })?;
    }
    let access = if a.prefetch {
        Access::Prefetch
    } else {
        Access::Selected
    };
    let (mut session, logits) = Session::open_with(&model, &a.context, backend, access)?;
    if let (None, Some(b)) = (&a.attention, a.budget) {
        session.set_budget(b)?;
    }
    let open_ms = t0.elapsed().as_secs_f64() * 1e3;
    let io_open = IoCounters::now();
    let context_tokens = session.position();
    let mut first: Option<f64> = None;
    let mut io_first = io_open;
    let mut stream = Stream::new(&model.tokenizer, a.json);
    let generated = session.continue_greedy(logits, &question, a.max_new, |t| {
        if first.is_none() {
            first = Some(t0.elapsed().as_secs_f64() * 1e3);
            io_first = IoCounters::now();
        }
        stream.push(t)
    })?;
    let new_ids = &generated.ids;
    let io_end = IoCounters::now();
    let p = session.profile();
    let new_text = model.tokenizer.decode(new_ids)?;
    let name = session.backend().name();
    if a.json {
        let v = serde_json::json!({
            "new_ids": new_ids,
            "new_text": new_text,
            "stop": generated.stop.name(),
            "context_tokens": context_tokens,
            "question_tokens": question.len(),
            "load_ms": load_ms,
            "open_ms": open_ms,
            "time_to_first_token_ms": first,
            // Faults and storage reads: of the open, of the steps to the first token (the
            // question's, per step), of the answer's later steps (per step).
            "io_open": io_open.since(io0, 1),
            "io_per_question_step": io_first.since(io_open, question.len()),
            "io_per_answer_step": io_end.since(io_first, new_ids.len().saturating_sub(1)),
            "decode_tokens_per_s": p.decode.tokens_per_s(),
            "attention": name,
            "attended_fraction": p.attended_fraction(),
            "decode_ms_per_token": p.decode.ms_per_token_json(),
        });
        out(&format!("{v}\n"));
    } else {
        out("\n");
        context_full_note(&model, generated.stop);
        eprintln!(
            "context {context_tokens} tokens opened in {open_ms:.1} ms; first token after {:.0} ms; decode {} tokens: {:.2} tokens/s ({name}, attended {:.1} % of the context)",
            first.unwrap_or(0.0),
            p.decode.tokens,
            p.decode.tokens_per_s(),
            100.0 * p.attended_fraction()
        );
    }
    Ok(())
}

/// `--text` (first `8 * tokens` characters after a BOS) or `--ids`, cut to `tokens`.
fn text_or_ids(model: &Gemma3, input: &TextInput, tokens: usize) -> Result<Vec<u32>> {
    let mut out = match (&input.text, &input.ids) {
        (Some(f), _) => {
            let text: String = read_text(f)?
                .chars()
                .take(tokens.saturating_mul(8))
                .collect();
            model.tokenizer.encode_prompt(&text)?
        }
        (_, Some(f)) => read_ids(f)?,
        _ => return Err(LlmError::InvalidArgument("give --text or --ids".into())),
    };
    out.truncate(tokens);
    Ok(out)
}

fn perplexity(a: &PerplexityArgs) -> Result<()> {
    let methods = backends(&a.attention, &a.budgets)?;
    let model = load(&a.model)?;
    let ids = text_or_ids(&model, &a.input, a.tokens)?;
    if ids.len() < a.tokens {
        eprintln!(
            "the input gives {} tokens, fewer than --tokens {}",
            ids.len(),
            a.tokens
        );
    }
    let mut report = |done: usize, total: usize| {
        if done.is_multiple_of(64) || done == total {
            eprintln!(
                "decoded {done} / {total} positions through {} methods",
                methods.len() + 1
            );
        }
    };
    let rows = pqcache_llm::eval::perplexity(&model, &ids, a.prefill, &methods, Some(&mut report))?;
    if a.json {
        let v = serde_json::json!({ "tokens": ids.len(), "prefill": a.prefill, "rows": rows });
        out(&format!("{v}\n"));
    } else {
        out(&format!(
            "{} tokens, {} prefilled densely, {} decoded teacher-forced; nll - dense and nll - \
             oracle (exact at the same budget) are paired per position, +- one standard error\n\
             {:>24} {:>7} {:>8} {:>8} {:>9} {:>18} {:>18} {:>7} {:>9}\n",
            ids.len(),
            a.prefill,
            ids.len() - a.prefill,
            "attention",
            "budget",
            "nll",
            "ppl",
            "kl",
            "nll - dense",
            "nll - oracle",
            "top1",
            "ms/token"
        ));
        let pm = |v: f64, se: f64| format!("{v:+.4} +- {se:.4}");
        for r in &rows {
            let oracle = match (r.oracle_dnll, r.oracle_dnll_se) {
                (Some(v), Some(se)) => pm(v, se),
                _ => "-".into(),
            };
            out(&format!(
                "{:>24} {:>7.3} {:>8.4} {:>8.3} {:>9.5} {:>18} {:>18} {:>7.4} {:>9.1}\n",
                r.attention,
                r.budget,
                r.nll,
                r.ppl,
                r.kl,
                pm(r.dnll, r.dnll_se),
                oracle,
                r.top1,
                r.ms_per_token
            ));
        }
    }
    Ok(())
}

/// Every (spec, budget) pair as a backend, `dense` once.
fn backends(specs: &[String], budgets: &[f64]) -> Result<Vec<Backend>> {
    let mut out = Vec::new();
    for spec in specs {
        for &b in budgets {
            let m = Backend::parse(spec, b)?;
            if !out.contains(&m) {
                out.push(m);
            }
        }
    }
    Ok(out)
}

fn passkey(a: &PasskeyArgs) -> Result<()> {
    let methods = backends(&a.attention, &a.budgets)?;
    let model = load(&a.model)?;
    let longest = a.lengths.iter().copied().max().unwrap_or(0);
    let text = read_text(&a.haystack)?;
    let mut haystack = model.tokenizer.encode(&text)?;
    if haystack.is_empty() {
        return Err(LlmError::InvalidArgument("an empty haystack".into()));
    }
    while haystack.len() < longest {
        haystack.extend_from_within(..haystack.len().min(longest - haystack.len()));
    }
    let mut report = |done: usize, total: usize| eprintln!("passkey trial {done} / {total}");
    let rows = pqcache_llm::eval::passkey(
        &model,
        &haystack,
        &a.lengths,
        &a.depths,
        a.trials,
        &methods,
        a.seed,
        Some(&mut report),
    )?;
    if a.json {
        out(&format!("{}\n", serde_json::json!({ "rows": rows })));
    } else {
        out(&format!(
            "{:>24} {:>7} {:>7} {:>6} {:>7}\n",
            "attention", "budget", "length", "depth", "passed"
        ));
        for r in &rows {
            out(&format!(
                "{:>24} {:>7.3} {:>7} {:>6.2} {:>4}/{}\n",
                r.attention, r.budget, r.length, r.depth, r.passed, r.trials
            ));
        }
    }
    Ok(())
}

fn dump(a: &DumpArgs) -> Result<()> {
    let model = load(&a.model)?;
    let ids = text_or_ids(&model, &a.input, a.tokens)?;
    if ids.len() < 2 {
        return Err(LlmError::InvalidArgument("need at least 2 tokens".into()));
    }
    let layers = if a.layers.is_empty() {
        model.global_layers().to_vec()
    } else {
        a.layers.clone()
    };
    let mut session = Session::new(&model, Backend::Dense)?;
    session.capture(&layers)?;
    let (mut loss, mut hits, mut n) = (0.0f64, 0usize, 0usize);
    let mut score = |p: usize, row: &[f32]| {
        if let Some(&t) = ids.get(p + 1) {
            loss += nll(row, t);
            hits += usize::from(argmax(row) == t);
            n += 1;
        }
    };
    let pb = progress_bar(ids.len());
    let mut tick = |done: usize, _: usize| {
        if let Some(pb) = &pb {
            pb.set_position(done as u64);
        }
    };
    session.prefill(
        &ids,
        PrefillOptions {
            chunk: a.model.chunk,
            logits: if a.no_nll {
                Logits::Last
            } else {
                Logits::All(&mut score)
            },
            progress: Some(&mut tick),
        },
    )?;
    let cap = session.take_capture().expect("capture was set");
    let (t, c) = (ids.len(), &model.cfg);
    std::fs::create_dir_all(&a.out).map_err(|source| LlmError::Io {
        path: a.out.clone(),
        source,
    })?;
    let stack = |per: &Vec<Vec<Vec<f16>>>| -> Vec<f16> {
        per.iter().flatten().flatten().copied().collect()
    };
    let (l, hd) = (layers.len(), c.head_dim);
    for (name, heads, rows) in [
        ("q.npy", c.heads, &cap.q),
        ("k.npy", c.kv_heads, &cap.k),
        ("v.npy", c.kv_heads, &cap.v),
    ] {
        npy::write(
            &a.out.join(name),
            &[l, heads, t, hd],
            &NpyData::F16(stack(rows)),
        )?;
    }
    npy::write(
        &a.out.join("ids.npy"),
        &[t],
        &NpyData::I64(ids.iter().map(|&i| i as i64).collect()),
    )?;
    let loss = loss / n.max(1) as f64;
    let kinds: Vec<&str> = layers
        .iter()
        .map(|&i| {
            if c.kinds[i] == pqcache_llm::LayerKind::Global {
                "global"
            } else {
                "sliding"
            }
        })
        .collect();
    let meta = serde_json::json!({
        "model": a.model.model.file_name().map(|f| f.to_string_lossy().into_owned()),
        "text": a.input.text.as_ref().map(|p| p.display().to_string()),
        "layers": layers,
        "layer_kind": kinds,
        "q_shape": [l, c.heads, t, hd],
        "k_shape": [l, c.kv_heads, t, hd],
        "dtype": "float16",
        "layout": "[layer, head, token, dim], C order",
        "query_heads_per_kv_head": c.group(),
        "vectors": "post q_norm/k_norm, post-RoPE (rotate-half), before the 1/sqrt(head_dim) score scale",
        "attn_scale": c.attn_scale,
        "hparams": {
            "n_layer": c.layers, "d": c.d_model, "n_head": c.heads, "n_kv": c.kv_heads, "hd": hd,
            "eps": c.eps, "base": c.rope_global_base, "swa": c.sliding_window, "bos": model.tokenizer.bos,
        },
        "nll": (!a.no_nll).then_some(loss),
        "top1": (!a.no_nll).then_some(hits as f64 / n.max(1) as f64),
        "precision": format!("{:?}", a.model.precision),
    });
    let path = a.out.join("meta.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&meta).expect("json") + "\n",
    )
    .map_err(|source| LlmError::Io { path, source })?;
    if a.no_nll {
        eprintln!("{t} tokens written to {}", a.out.display());
    } else {
        eprintln!(
            "{t} tokens, nll {loss:.4} (ppl {:.2}), written to {}",
            loss.exp(),
            a.out.display()
        );
    }
    Ok(())
}

fn tokenize(a: &TokenizeArgs) -> Result<()> {
    let f = pqcache_llm::weights::GgufFile::open(&a.model)?;
    let tok = pqcache_llm::tokenizer::GemmaTokenizer::from_gguf(&f.content)?;
    let mut ids = tok.encode_prompt(&read_text(&a.text)?)?;
    if let Some(n) = a.tokens {
        ids.truncate(n);
    }
    out(&(serde_json::to_string(&ids).expect("json") + "\n"));
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    let r = match &cli.cmd {
        Cmd::Generate(a) => generate(a),
        Cmd::Prefill(a) => prefill(a),
        Cmd::Ask(a) => ask(a),
        Cmd::Dump(a) => dump(a),
        Cmd::Tokenize(a) => tokenize(a),
        Cmd::Perplexity(a) => perplexity(a),
        Cmd::Passkey(a) => passkey(a),
    };
    if let Err(e) = r {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
