//! CPU feature levels and runtime dispatch.
//!
//! The CPU is probed once ([`Level::detected`], cached in a `OnceLock`). An index or searcher
//! resolves its kernel table when it is built, from [`Level::best`], so that no hot loop
//! branches on the level. The environment variable `PQCACHE_SIMD_LEVEL`
//! (`scalar`, `v3`, `v4`, `v4icl`, `neon`) forces a lower level for tests and benches; it is capped at
//! what the CPU supports, so it can never select an instruction set the CPU lacks.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

/// Every level, lowest first.
const ALL: [Level; 5] = [
    Level::Scalar,
    Level::Neon,
    Level::V3,
    Level::V4,
    Level::V4Icl,
];

/// Name of the environment variable that caps the SIMD level.
pub const LEVEL_ENV: &str = "PQCACHE_SIMD_LEVEL";

/// An instruction-set level. Ordered: a higher x86 level implies every lower one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Portable Rust, no explicit SIMD. Runs everywhere; the test oracle.
    Scalar,
    /// aarch64 Advanced SIMD (NEON), always present on aarch64.
    Neon,
    /// x86-64-v3: AVX2, FMA, F16C (Haswell and later, Zen 1 and later).
    V3,
    /// x86-64-v4: AVX-512 F, BW, VL, DQ (Skylake-SP and later, Zen 4 and later).
    V4,
    /// x86-64-v4 plus AVX-512 VBMI (byte permutes across the register) and VNNI (u8 dot
    /// products): Ice Lake, Sapphire Rapids and later, Zen 4 and later. Only the fast-scan
    /// kernel differs from [`Level::V4`].
    V4Icl,
}

impl Level {
    /// The best level this CPU supports, probed once.
    pub fn detected() -> Level {
        static DETECTED: OnceLock<Level> = OnceLock::new();
        *DETECTED.get_or_init(probe)
    }

    /// The level to use: [`Level::detected`], lowered by `PQCACHE_SIMD_LEVEL` if set.
    /// An unknown value of the variable is ignored.
    pub fn best() -> Level {
        let detected = Level::detected();
        match std::env::var(LEVEL_ENV) {
            Ok(s) => match s.parse::<Level>() {
                Ok(wanted) => wanted.capped(),
                Err(_) => detected,
            },
            Err(_) => detected,
        }
    }

    /// `self` if the CPU supports it, otherwise the best supported level below it.
    pub fn capped(self) -> Level {
        let detected = Level::detected();
        if self.is_supported() {
            self
        } else if self > detected && detected != Level::Neon {
            detected
        } else {
            Level::Scalar
        }
    }

    /// Whether the running CPU can execute kernels of this level.
    pub fn is_supported(self) -> bool {
        let detected = Level::detected();
        match self {
            Level::Scalar => true,
            Level::Neon => detected == Level::Neon,
            Level::V3 => detected >= Level::V3,
            Level::V4 => detected >= Level::V4,
            Level::V4Icl => detected == Level::V4Icl,
        }
    }

    /// Every level this CPU supports, lowest first (for tests and benches).
    pub fn all_supported() -> Vec<Level> {
        ALL.into_iter().filter(|l| l.is_supported()).collect()
    }

    /// Short lower-case name, as accepted by `PQCACHE_SIMD_LEVEL`.
    pub fn name(self) -> &'static str {
        match self {
            Level::Scalar => "scalar",
            Level::Neon => "neon",
            Level::V3 => "v3",
            Level::V4 => "v4",
            Level::V4Icl => "v4icl",
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Error for an unknown level name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownLevel(pub String);

impl fmt::Display for UnknownLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown SIMD level {:?} (expected scalar, v3, v4, v4icl or neon)",
            self.0
        )
    }
}

impl std::error::Error for UnknownLevel {}

impl FromStr for Level {
    type Err = UnknownLevel;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "scalar" | "none" => Ok(Level::Scalar),
            "neon" => Ok(Level::Neon),
            "v3" | "avx2" => Ok(Level::V3),
            "v4" | "avx512" => Ok(Level::V4),
            "v4icl" | "icelake" => Ok(Level::V4Icl),
            other => Err(UnknownLevel(other.to_string())),
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn probe() -> Level {
    let v3 = is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c");
    let v4 = v3
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512dq");
    let icl =
        v4 && is_x86_feature_detected!("avx512vbmi") && is_x86_feature_detected!("avx512vnni");
    if icl {
        Level::V4Icl
    } else if v4 {
        Level::V4
    } else if v3 {
        Level::V3
    } else {
        Level::Scalar
    }
}

#[cfg(target_arch = "aarch64")]
fn probe() -> Level {
    if std::arch::is_aarch64_feature_detected!("neon") {
        Level::Neon
    } else {
        Level::Scalar
    }
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn probe() -> Level {
    Level::Scalar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display_round_trip() {
        for l in ALL {
            assert_eq!(l.name().parse::<Level>().unwrap(), l);
        }
        assert!("sse9".parse::<Level>().is_err());
    }

    #[test]
    fn capped_never_exceeds_support() {
        for l in ALL {
            assert!(l.capped().is_supported(), "{l} capped to unsupported");
        }
        assert!(Level::all_supported().contains(&Level::Scalar));
        assert!(Level::detected().is_supported());
    }
}
