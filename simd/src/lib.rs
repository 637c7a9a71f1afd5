//! # pqcache-simd: the kernels of pqcache
//!
//! Kernels only: no I/O, no allocation inside a kernel, no dependency on the root crate.
//!
//! * [`level`]: CPU feature detection, done once, and the [`Level`] a kernel table is built for.
//!   Levels follow the x86-64 micro-architecture levels: `scalar`, `v3` (AVX2 + FMA + F16C),
//!   `v4` (AVX-512 F/BW/VL), `v4icl` (plus VBMI and VNNI), and `neon` on aarch64.
//! * [`distance`]: dot products and squared L2 distances, f32 x f32 and f32 x f16.
//! * [`argmin`]: nearest centroid from GEMM output (k-means assignment, PQ encoding).
//! * [`fastscan`]: 4-bit fast-scan accumulation (u8 tables in registers, u16 sums, 32-vector blocks).
//! * [`filter`]: positions of the scores at or above a floor (top-k selection).
//! * [`lut`]: quantization of fast-scan tables (float rows of 16 to u8).
//! * [`softmax`]: softmax weights of fast-scan sums through a table (attention selection).
//! * [`adc`]: asymmetric distance computation with a float lookup table over byte codes
//!   (one byte per sub-quantizer, 8-bit or unpacked 4-bit product-quantization codes).
//!
//! Every kernel family has one scalar reference, which is both the production fallback and the
//! test oracle. Integer kernels and the ADC kernels (which add in the same order as the scalar
//! code) match it bit for bit; float reductions that reorder additions match an f64 reference
//! within a stated tolerance.
//!
//! Public entry points are safe: they check shapes once, then call the raw per-ISA kernel
//! through a table resolved for a [`Level`] that the running CPU is known to support.
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

pub mod adc;
pub mod argmin;
pub mod distance;
pub mod fastscan;
pub mod filter;
pub mod level;
pub mod lut;
pub mod softmax;

pub use level::Level;
