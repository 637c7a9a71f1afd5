//! Similarity metrics.

use crate::error::Error;
use std::fmt;
use std::str::FromStr;

/// How vectors are compared.
///
/// Internally every search maximises a *score*: the inner product itself, or the negated
/// squared L2 distance. Results report *distances* in the metric's own convention: inner
/// products (larger is better, sorted descending) or squared L2 distances (smaller is better,
/// sorted ascending), as FAISS does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Metric {
    /// Maximum inner product (MIPS); what attention needs.
    #[default]
    InnerProduct,
    /// Squared Euclidean distance.
    L2,
}

impl Metric {
    /// Short name: `ip` or `l2`.
    pub fn name(self) -> &'static str {
        match self {
            Metric::InnerProduct => "ip",
            Metric::L2 => "l2",
        }
    }

    /// Converts a metric value (inner product or squared distance) to a score to maximise.
    #[inline(always)]
    pub fn to_score(self, value: f32) -> f32 {
        match self {
            Metric::InnerProduct => value,
            Metric::L2 => -value,
        }
    }

    /// Inverse of [`Metric::to_score`].
    #[inline(always)]
    pub fn from_score(self, score: f32) -> f32 {
        self.to_score(score)
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Metric {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "ip" | "inner_product" | "dot" => Ok(Metric::InnerProduct),
            "l2" | "euclidean" => Ok(Metric::L2),
            other => Err(Error::InvalidArgument(format!(
                "unknown metric {other:?} (expected ip or l2)"
            ))),
        }
    }
}
