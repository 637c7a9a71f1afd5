//! Encoding (nearest sub-centroid per sub-space, through the k-means assignment GEMM) and
//! decoding (concatenation of the chosen sub-centroids).

use super::ProductQuantizer;
use crate::error::{Error, Result};
use crate::index::check_vectors;
use crate::kmeans::assign;
use crate::linalg::row_norms_sq;
use pqcache_simd::argmin::NearestKernel;
use rayon::prelude::*;

/// Rows encoded per parallel task.
const ENCODE_CHUNK: usize = 4096;

impl ProductQuantizer {
    /// Encodes `x` (`n * d`) into `n * m` bytes, one centroid index per sub-quantizer.
    pub fn compute_codes(&self, x: &[f32]) -> Result<Vec<u8>> {
        if !self.is_trained() {
            return Err(Error::NotTrained);
        }
        let n = check_vectors(x, self.d, "vectors")?;
        let mut codes = vec![0u8; n * self.m];
        self.encode_into(x, &mut codes);
        Ok(codes)
    }

    /// Encodes validated, finite rows into `codes` (`rows * m`). The quantizer must be trained.
    pub(crate) fn encode_into(&self, x: &[f32], codes: &mut [u8]) {
        let (d, m, dsub, ksub) = (self.d, self.m, self.dsub(), self.ksub());
        let nearest = NearestKernel::best();
        codes
            .par_chunks_mut(ENCODE_CHUNK * m)
            .zip(x.par_chunks(ENCODE_CHUNK * d))
            .for_each(|(out, rows)| {
                let n = rows.len() / d;
                let mut sub = vec![0.0f32; n * dsub];
                let mut labels = vec![0u32; n];
                for j in 0..m {
                    for (s, row) in sub.chunks_exact_mut(dsub).zip(rows.chunks_exact(d)) {
                        s.copy_from_slice(&row[j * dsub..(j + 1) * dsub]);
                    }
                    let norms = row_norms_sq(&sub, dsub);
                    assign(
                        &nearest,
                        &sub,
                        &norms,
                        dsub,
                        self.codebook(j),
                        ksub,
                        &mut labels,
                        None,
                    );
                    for (i, &l) in labels.iter().enumerate() {
                        out[i * m + j] = l as u8;
                    }
                }
            });
    }

    /// Reconstructs `n` vectors from `n * m` code bytes.
    pub fn decode(&self, codes: &[u8]) -> Result<Vec<f32>> {
        if !self.is_trained() {
            return Err(Error::NotTrained);
        }
        if !codes.len().is_multiple_of(self.m) {
            return Err(Error::DimensionMismatch {
                expected: self.m,
                got: codes.len() % self.m,
            });
        }
        let ksub = self.ksub();
        let mut out = Vec::with_capacity(codes.len() / self.m * self.d);
        for code in codes.chunks_exact(self.m) {
            for (j, &c) in code.iter().enumerate() {
                if c as usize >= ksub {
                    return Err(Error::InvalidArgument(format!(
                        "code byte {c} out of range for {} bits",
                        self.nbits.bits()
                    )));
                }
                out.extend_from_slice(self.centroid(j, c as usize));
            }
        }
        Ok(out)
    }
}
