//! # pqcache-llm: Gemma-3 on the CPU, its global-attention layers decoding through pqcache
//!
//! | module | what |
//! |---|---|
//! | [`config`] | hyper-parameters from the GGUF metadata |
//! | [`weights`] | GGUF tensors as quantized (or dequantized) matrices |
//! | [`tokenizer`] | the Gemma tokenizer rebuilt from the GGUF vocabulary |
//! | [`kernels`] | dense causal attention (prefill, sliding layers) |
//! | [`model`] | the forward pass and a decoding [`Session`] with a dense or retrieval backend |
//! | [`context`] | a prefilled sequence saved as one file, reopened zero-copy and continued |
//! | [`eval`] | teacher-forced perplexity, KL to dense and top-1 agreement per backend |
//!
//! ```no_run
//! use pqcache_llm::{Backend, Gemma3, Precision, PrefillOptions, Session};
//! let model = Gemma3::load("gemma-3-270m-q4_k_m.gguf".as_ref(), Precision::Quantized)?;
//! let mut s = Session::new(&model, Backend::parse("fastscan:64x4", 0.1)?)?;
//! let prompt = model.tokenizer.encode_prompt("The quick brown fox")?;
//! let mut logits = s.prefill(&prompt, PrefillOptions::default())?;
//! for _ in 0..16 {
//!     let next = pqcache_llm::model::argmax(&logits);
//!     logits = s.decode(next)?;
//! }
//! # Ok::<(), pqcache_llm::LlmError>(())
//! ```
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod config;
pub mod context;
pub mod error;
pub mod eval;
pub mod kernels;
pub mod model;
pub mod tokenizer;
pub mod weights;

pub use config::{Gemma3Config, LayerKind};
pub use error::{LlmError, Result};
pub use model::{
    Backend, Capture, Gemma3, Generated, Logits, PrefillOptions, Profile, Session, Stop,
};
pub use weights::Precision;
