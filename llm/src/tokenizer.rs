//! The Gemma tokenizer, built from a GGUF file's own vocabulary (no `tokenizer.json` needed).
//!
//! A Gemma GGUF stores the SentencePiece vocabulary (`tokenizer.ggml.tokens`, `token_type`) but
//! no merges. This builds the same HF `tokenizers` pipeline that `transformers` builds from
//! the same file (its GGUF converter, `GemmaTokenizer`), which is what made the reference
//! dumps' `ids.npy`:
//!
//! * model: BPE with byte fallback, `<unk>` fused; merges recovered from the vocabulary: every
//!   split of a token into two vocabulary tokens, ordered by the merged token's position in
//!   the file (Gemma's scores do not follow its merge order; the file's order does), then by
//!   longer left piece first;
//! * tokens of two or more spaces (stored as real spaces) are respelled with `▁`, as the model
//!   looks them up;
//! * normalizer: `' '` -> `'▁'`; pre-tokenizer: split on `' '` (after the normalizer it never
//!   matches: the text is one word); decoder: `'▁'` -> `' '`, byte fallback, fuse;
//! * control tokens (`token_type` 3: `<bos>`, `<start_of_turn>`, ...) are special added tokens,
//!   user-defined ones (4, spelled as in the file and found in the vocabulary) plain added
//!   tokens: matched whole in the text, never split.
//!
//! [`GemmaTokenizer::encode`] adds no BOS; [`GemmaTokenizer::encode_prompt`] prepends it.

use crate::error::{LlmError, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use std::collections::HashMap;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::replace::Replace;
use tokenizers::pre_tokenizers::split::Split;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// Largest vocabulary accepted from a file.
const MAX_VOCAB: usize = 1 << 22;

/// A Gemma tokenizer and its special ids.
pub struct GemmaTokenizer {
    inner: Tokenizer,
    /// Beginning of sequence.
    pub bos: u32,
    /// End of sequence.
    pub eos: u32,
    /// Vocabulary size.
    pub vocab: usize,
    /// BLAKE3 of what the tokenizer is built from (the file's tokens and their types, the
    /// special ids, this builder's recipe): equal digests tokenize alike.
    pub digest: [u8; 32],
}

/// Names how [`GemmaTokenizer::from_gguf`] builds a tokenizer; change it with the recipe.
const DIGEST_RECIPE: &[u8] = b"pqcache-llm gemma tokenizer 1";

/// Python's `str.isspace` (what the converter's `t.strip()` removes): Unicode white space
/// plus the four information separators U+001C..U+001F.
fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

fn string_array<'a>(c: &'a Content, key: &str) -> Result<&'a Vec<Value>> {
    match c.metadata.get(key) {
        Some(Value::Array(a)) => Ok(a),
        _ => Err(LlmError::Tokenizer(format!("missing {key}"))),
    }
}

fn id(c: &Content, key: &str, vocab: usize) -> Result<u32> {
    let v = c
        .metadata
        .get(key)
        .ok_or_else(|| LlmError::Tokenizer(format!("missing {key}")))?
        .to_u32()
        .map_err(|e| LlmError::Tokenizer(format!("{key}: {e}")))?;
    if v as usize >= vocab {
        return Err(LlmError::Tokenizer(format!(
            "{key} = {v} is outside the vocabulary ({vocab})"
        )));
    }
    Ok(v)
}

/// The merges implied by a vocabulary (see the module doc): for each token in file order
/// (the last position of a repeated token), its splits into two vocabulary tokens, longer
/// left piece first.
fn recover_merges(tokens: &[String]) -> Vec<(String, String)> {
    let mut index: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        index.insert(t.as_str(), i);
    }
    let mut order: Vec<(&str, usize)> = index.iter().map(|(t, &i)| (*t, i)).collect();
    order.sort_unstable_by_key(|&(_, i)| i);
    let mut merges = Vec::new();
    for (t, _) in order {
        let cuts: Vec<usize> = t.char_indices().map(|(i, _)| i).skip(1).collect();
        for &cut in cuts.iter().rev() {
            let (l, r) = t.split_at(cut);
            if index.contains_key(l) && index.contains_key(r) {
                merges.push((l.to_string(), r.to_string()));
            }
        }
    }
    merges
}

impl GemmaTokenizer {
    /// Builds the tokenizer from a GGUF file's `tokenizer.ggml.*` metadata.
    pub fn from_gguf(c: &Content) -> Result<GemmaTokenizer> {
        match c.metadata.get("tokenizer.ggml.model") {
            Some(Value::String(m)) if m == "llama" => {}
            other => {
                return Err(LlmError::Tokenizer(format!(
                    "tokenizer.ggml.model is {other:?}: a SentencePiece (\"llama\") vocabulary is expected"
                )))
            }
        }
        let raw = string_array(c, "tokenizer.ggml.tokens")?;
        if raw.is_empty() || raw.len() > MAX_VOCAB {
            return Err(LlmError::Tokenizer(format!(
                "{} tokens (1..={MAX_VOCAB} expected)",
                raw.len()
            )));
        }
        let spelled: Vec<&str> = raw
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.as_str()),
                _ => Err(LlmError::Tokenizer("a token is not a string".into())),
            })
            .collect::<Result<_>>()?;
        let tokens: Vec<String> = spelled
            .iter()
            .map(|s| {
                if s.contains(' ') && s.chars().all(py_isspace) {
                    "\u{2581}".repeat(s.chars().count())
                } else {
                    s.to_string()
                }
            })
            .collect();
        let types: Vec<i64> = match c.metadata.get("tokenizer.ggml.token_type") {
            Some(Value::Array(a)) if a.len() == tokens.len() => a
                .iter()
                .map(|v| v.to_i32().map(|x| x as i64).unwrap_or(1))
                .collect(),
            _ => vec![1; tokens.len()],
        };
        let vocab = tokens.len();
        let (bos, eos) = (
            id(c, "tokenizer.ggml.bos_token_id", vocab)?,
            id(c, "tokenizer.ggml.eos_token_id", vocab)?,
        );
        let unk = id(c, "tokenizer.ggml.unknown_token_id", vocab)
            .map(|i| tokens[i as usize].clone())
            .unwrap_or_else(|_| "<unk>".into());
        let merges = recover_merges(&tokens);
        let map: HashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(
                map.iter()
                    .map(|(t, &i)| (t.clone(), i))
                    .collect::<tokenizers::models::bpe::Vocab>(),
                merges,
            )
            .unk_token(unk)
            .fuse_unk(true)
            .byte_fallback(true)
            .build()
            .map_err(|e| LlmError::Tokenizer(e.to_string()))?;
        let mut inner = Tokenizer::new(bpe);
        let bad = |e: tokenizers::Error| LlmError::Tokenizer(e.to_string());
        inner
            .with_normalizer(Some(Replace::new(" ", "\u{2581}").map_err(bad)?))
            .map_err(bad)?;
        inner.with_pre_tokenizer(Some(
            Split::new(" ", SplitDelimiterBehavior::MergedWithPrevious, false).map_err(bad)?,
        ));
        inner.with_decoder(Some(Sequence::new(vec![
            DecoderWrapper::Replace(Replace::new("\u{2581}", " ").map_err(bad)?),
            DecoderWrapper::ByteFallback(ByteFallback::new()),
            DecoderWrapper::Fuse(Fuse::new()),
        ])));
        // Added tokens as the file spells them (a token of spaces is not respelled here, so
        // a user-defined one is then not in the vocabulary and not added, as in the converter).
        let added = |kind: i64, special: bool| -> Vec<AddedToken> {
            spelled
                .iter()
                .zip(&types)
                .filter(|&(t, &ty)| ty == kind && (special || map.contains_key(*t)))
                .map(|(t, _)| AddedToken::from(t.to_string(), special).normalized(false))
                .collect()
        };
        inner.add_special_tokens(added(3, true)).map_err(bad)?;
        inner.add_tokens(added(4, false)).map_err(bad)?;
        // What the tokenizer is built from, and how: the same digest means the same ids.
        let mut h = blake3::Hasher::new();
        h.update(DIGEST_RECIPE);
        for (t, ty) in spelled.iter().zip(&types) {
            h.update(&(t.len() as u64).to_le_bytes());
            h.update(t.as_bytes());
            h.update(&ty.to_le_bytes());
        }
        h.update(&bos.to_le_bytes());
        h.update(&eos.to_le_bytes());
        Ok(GemmaTokenizer {
            inner,
            bos,
            eos,
            vocab,
            digest: *h.finalize().as_bytes(),
        })
    }

    /// The token ids of `text`, no BOS.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| LlmError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// BOS, then the ids of `text`: a prompt as the model was trained to see it.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = vec![self.bos];
        ids.extend(self.encode(text)?);
        Ok(ids)
    }

    /// The text of `ids` (special tokens kept as written).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| LlmError::Tokenizer(e.to_string()))
    }

    /// The underlying HF tokenizer (serialisable with `to_string`).
    pub fn hf(&self) -> &Tokenizer {
        &self.inner
    }
}
