//! Product quantization.
//!
//! A `d`-dimensional vector is split into `m` contiguous sub-vectors of `dsub = d / m`
//! dimensions. Each sub-space `j` has its own codebook of `ksub = 2^nbits` centroids, trained
//! by k-means ([`train`]). A vector is encoded as the `m` indices of its nearest sub-centroids
//! ([`encode`]); a query is compared with every code through a lookup table of the `m * ksub`
//! partial scores ([`lut`]), so that scoring one code costs `m` table reads.
//!
//! Vocabulary (FAISS's): `m` sub-quantizers, `nbits` bits per index, `ksub = 1 << nbits`
//! centroids per sub-quantizer, `dsub = d / m`, `code_size` bytes per encoded vector.
//!
//! Memory layout:
//!
//! ```text
//! centroids : m * ksub * dsub f32     centroid c of sub-space j at [(j * ksub + c) * dsub ..][..dsub]
//! codes     : n * m u8 ("unpacked")   codes[i * m + j] = centroid index of vector i in sub-space j
//! lut       : m * ksub f32            lut[j * ksub + c] = <q_j, c> (inner product) or ||q_j - c||² (L2)
//! ```
//!
//! Codes are stored one byte per sub-quantizer for both 8-bit and 4-bit quantizers in this
//! "unpacked" form (`code_size = m`); the 4-bit fast-scan layout packs them two per byte in
//! blocks of 32 vectors instead.

pub mod encode;
pub mod lut;
pub mod pack;
pub mod train;
pub mod transform;

use crate::error::{Error, Result};

/// Bits per sub-quantizer index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Nbits {
    /// 16 centroids per sub-space; the fast-scan width.
    Four,
    /// 64 centroids per sub-space (PQCache's default for attention keys).
    Six,
    /// 256 centroids per sub-space.
    Eight,
}

impl Nbits {
    /// From a bit count (4, 6 or 8).
    pub fn from_bits(bits: usize) -> Result<Nbits> {
        match bits {
            4 => Ok(Nbits::Four),
            6 => Ok(Nbits::Six),
            8 => Ok(Nbits::Eight),
            other => Err(Error::InvalidArgument(format!(
                "nbits must be 4, 6 or 8, got {other}"
            ))),
        }
    }

    /// The bit count.
    pub fn bits(self) -> usize {
        match self {
            Nbits::Four => 4,
            Nbits::Six => 6,
            Nbits::Eight => 8,
        }
    }

    /// `1 << bits`.
    pub fn ksub(self) -> usize {
        1 << self.bits()
    }
}

/// A product quantizer: `m` codebooks of `ksub` centroids of dimension `dsub`.
#[derive(Clone, Debug, PartialEq)]
pub struct ProductQuantizer {
    d: usize,
    m: usize,
    nbits: Nbits,
    /// `m * ksub * dsub`, empty until trained.
    centroids: Vec<f32>,
    /// Derived from `centroids` for the lookup tables: `m * dsub * ksub`, sub-space `j`'s
    /// codebook transposed (`[j][t][c]`), so that a table row is `dsub` AXPYs over `ksub`.
    pub(crate) centroids_t: Vec<f32>,
    /// Derived: `m * ksub` squared norms of the centroids (L2 tables).
    pub(crate) centroid_norms: Vec<f32>,
    /// Derived on first use (IVF's L2 tables only): `centroids_t` in the blocked layout of
    /// [`pqcache_simd::lut::blocked_codebook`], from which
    /// [`ProductQuantizer::dots_blocked`] makes a query's inner-product table in the layout
    /// of the IVF table kernel.
    pub(crate) centroids_blocked: DerivedCache<Vec<f32>>,
}

/// A value derived from its owner's other fields on first use: cloned with it, reset when
/// they change, and left out of comparisons (two owners with the same fields are equal
/// whether or not either has derived it yet).
#[derive(Clone, Debug, Default)]
pub(crate) struct DerivedCache<T>(std::sync::OnceLock<T>);

impl<T> DerivedCache<T> {
    /// The value, made by `make` the first time.
    pub(crate) fn get_or_init(&self, make: impl FnOnce() -> T) -> &T {
        self.0.get_or_init(make)
    }
}

impl<T> PartialEq for DerivedCache<T> {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl ProductQuantizer {
    /// An untrained quantizer. `m` must divide `d` and be at least 1.
    pub fn new(d: usize, m: usize, nbits: Nbits) -> Result<ProductQuantizer> {
        if d == 0 || m == 0 {
            return Err(Error::InvalidArgument(format!(
                "d ({d}) and m ({m}) must be positive"
            )));
        }
        if !d.is_multiple_of(m) {
            return Err(Error::InvalidArgument(format!(
                "m = {m} does not divide d = {d}"
            )));
        }
        crate::limits::check_dim(d)?;
        Ok(ProductQuantizer {
            d,
            m,
            nbits,
            centroids: Vec::new(),
            centroids_t: Vec::new(),
            centroid_norms: Vec::new(),
            centroids_blocked: DerivedCache::default(),
        })
    }

    /// A trained quantizer from its centroids (`m * ksub * dsub` values).
    pub fn from_centroids(
        d: usize,
        m: usize,
        nbits: Nbits,
        centroids: Vec<f32>,
    ) -> Result<ProductQuantizer> {
        let mut pq = ProductQuantizer::new(d, m, nbits)?;
        let want = m * nbits.ksub() * (d / m);
        if centroids.len() != want {
            return Err(Error::DimensionMismatch {
                expected: want,
                got: centroids.len(),
            });
        }
        if let Some(i) = centroids.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFinite {
                what: "centroids",
                head: None,
                row: i / (d / m),
                col: i % (d / m),
            });
        }
        pq.set_centroids(centroids);
        Ok(pq)
    }

    /// Installs trained centroids and derives the table-building layouts.
    pub(crate) fn set_centroids(&mut self, centroids: Vec<f32>) {
        let (m, ksub, dsub) = (self.m, self.ksub(), self.dsub());
        let mut t = vec![0.0f32; centroids.len()];
        let mut norms = vec![0.0f32; m * ksub];
        for j in 0..m {
            for c in 0..ksub {
                let cent = &centroids[(j * ksub + c) * dsub..][..dsub];
                norms[j * ksub + c] = cent.iter().map(|v| v * v).sum();
                for (u, &v) in cent.iter().enumerate() {
                    t[(j * dsub + u) * ksub + c] = v;
                }
            }
        }
        self.centroids_blocked = DerivedCache::default();
        self.centroids = centroids;
        self.centroids_t = t;
        self.centroid_norms = norms;
    }

    /// Vector dimension.
    pub fn dim(&self) -> usize {
        self.d
    }
    /// Number of sub-quantizers.
    pub fn m(&self) -> usize {
        self.m
    }
    /// Bits per index.
    pub fn nbits(&self) -> Nbits {
        self.nbits
    }
    /// Centroids per sub-quantizer.
    pub fn ksub(&self) -> usize {
        self.nbits.ksub()
    }
    /// Dimension of a sub-vector.
    pub fn dsub(&self) -> usize {
        self.d / self.m
    }
    /// Bytes per unpacked code (one per sub-quantizer).
    pub fn code_size(&self) -> usize {
        self.m
    }
    /// Whether the codebooks are trained.
    pub fn is_trained(&self) -> bool {
        !self.centroids.is_empty()
    }
    /// All centroids, `m * ksub * dsub`.
    pub fn centroids(&self) -> &[f32] {
        &self.centroids
    }
    /// Centroid `c` of sub-space `j`.
    pub fn centroid(&self, j: usize, c: usize) -> &[f32] {
        let dsub = self.dsub();
        let at = (j * self.ksub() + c) * dsub;
        &self.centroids[at..at + dsub]
    }
    /// The codebook of sub-space `j` (`ksub * dsub`).
    pub fn codebook(&self, j: usize) -> &[f32] {
        let len = self.ksub() * self.dsub();
        &self.centroids[j * len..(j + 1) * len]
    }
}
