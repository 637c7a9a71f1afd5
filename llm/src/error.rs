//! The runtime's error type.

use std::path::PathBuf;

/// What can go wrong loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The GGUF file is malformed or not a model this runtime runs.
    #[error("{}: {reason}", path.display())]
    Gguf {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A hyper-parameter is missing or out of range.
    #[error("model metadata: {0}")]
    Metadata(String),
    /// The tokenizer could not be built or could not encode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// An argument is out of range (token id, context length, option).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A context file could not be read (truncated, corrupt, another format version: the
    /// engine's error says which section and why).
    #[error("{}: {source}", path.display())]
    ContextFile {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: pqcache::Error,
    },
    /// A context file that is sound but was not saved for this model and runtime (another
    /// model, another tokenizer, another shape), or whose state does not add up.
    #[error("{}: {reason}", path.display())]
    Context {
        /// The file.
        path: PathBuf,
        /// What differs.
        reason: String,
    },
    /// The retrieval engine refused (shapes, settings).
    #[error(transparent)]
    Retrieval(#[from] pqcache::Error),
    /// A tensor operation failed (candle).
    #[error("tensor: {}", candle_message(.0))]
    Tensor(#[from] candle_core::Error),
}

/// A candle error's message without the backtrace candle appends to it when `RUST_BACKTRACE`
/// is set: a bad file is the user's error, and twenty frames under it read as a crash.
pub(crate) fn candle_message(e: &candle_core::Error) -> String {
    use candle_core::Error as E;
    match e {
        E::WithBacktrace { inner, .. } => candle_message(inner),
        E::Context { inner, context } => format!("{context}: {}", candle_message(inner)),
        E::WithPath { inner, path } => format!("{}: {}", path.display(), candle_message(inner)),
        e => e.to_string(),
    }
}

/// `Result` with [`LlmError`].
pub type Result<T> = std::result::Result<T, LlmError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candle_errors_read_without_their_backtrace() {
        let bt = || Box::new(std::backtrace::Backtrace::force_capture());
        let inner = candle_core::Error::Msg("unknown magic 0x746f6f72".into());
        let wrapped = candle_core::Error::WithBacktrace {
            inner: Box::new(candle_core::Error::WithPath {
                inner: Box::new(candle_core::Error::WithBacktrace {
                    inner: Box::new(inner),
                    backtrace: bt(),
                }),
                path: "model.gguf".into(),
            }),
            backtrace: bt(),
        };
        // candle's own Display carries the frames.
        assert!(wrapped.to_string().lines().count() > 1);
        assert_eq!(
            LlmError::Tensor(wrapped).to_string(),
            "tensor: model.gguf: unknown magic 0x746f6f72"
        );
    }
}
