//! Packed 4-bit codes for fast-scan: blocks of 32 vectors, sub-quantizer pairs as nibbles.
//!
//! The byte layout is the one `pqcache_simd::fastscan` scans (see its module doc):
//!
//! ```text
//! codes      = block 0 | block 1 | ... | block nblocks-1          (nblocks = ceil(ntotal / 32))
//! block      = chunk 0 | ... | chunk m2/2-1                       (m2 = m rounded up to even)
//! chunk p    = 32 bytes:
//!              +---------------------------------+---------------------------------+
//!   byte b     |  0 .. 15: sub-quantizer 2p      | 16 .. 31: sub-quantizer 2p+1    |
//!   lo nibble  |  vector b                       |  vector b - 16                  |
//!   hi nibble  |  vector b + 16                  |  vector b                       |
//!              +---------------------------------+---------------------------------+
//! ```
//!
//! The last block is padded with zero codes; readers drop padded positions (`>= ntotal`).
//! Appending a vector writes its `m` nibbles into the last block (opening a zeroed block every
//! 32 vectors): `O(m)`, nothing is repacked.

use crate::buf::Buf;
use crate::error::{Error, Result};
use pqcache_simd::fastscan::{block_bytes, code_at, set_code_at, BBS, MAX_M};

/// 4-bit codes of `ntotal` vectors in fast-scan blocks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackedCodes {
    m: usize,
    m2: usize,
    ntotal: usize,
    data: Buf<u8>,
}

impl PackedCodes {
    /// Empty storage for codes of `m` sub-quantizers (`1..=256`).
    pub fn new(m: usize) -> Result<PackedCodes> {
        if m == 0 || m > MAX_M {
            return Err(Error::InvalidArgument(format!(
                "fast-scan needs 1 <= m <= {MAX_M} sub-quantizers, got {m}"
            )));
        }
        Ok(PackedCodes {
            m,
            m2: m + m % 2,
            ntotal: 0,
            data: Buf::new(),
        })
    }

    /// Codes of `ntotal` vectors over `data` (`ceil(ntotal / 32)` blocks; e.g. mapped).
    pub fn from_parts(m: usize, ntotal: usize, data: Buf<u8>) -> Result<PackedCodes> {
        let mut p = PackedCodes::new(m)?;
        let want = ntotal.div_ceil(BBS).checked_mul(p.block_bytes());
        if want != Some(data.len()) {
            return Err(Error::InvalidArgument(format!(
                "{} packed bytes for {ntotal} vectors of m = {m}",
                data.len()
            )));
        }
        p.ntotal = ntotal;
        p.data = data;
        Ok(p)
    }

    /// Sub-quantizers.
    pub fn m(&self) -> usize {
        self.m
    }
    /// Sub-quantizers rounded up to even (the packed width).
    pub fn m2(&self) -> usize {
        self.m2
    }
    /// Number of vectors.
    pub fn ntotal(&self) -> usize {
        self.ntotal
    }
    /// Number of 32-vector blocks.
    pub fn nblocks(&self) -> usize {
        self.ntotal.div_ceil(BBS)
    }
    /// Bytes per block.
    pub fn block_bytes(&self) -> usize {
        block_bytes(self.m2)
    }
    /// The packed bytes, `nblocks * block_bytes`.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// Appends one vector's codes (`m` values, each `< 16`).
    pub fn push(&mut self, code: &[u8]) -> Result<()> {
        if code.len() != self.m {
            return Err(Error::DimensionMismatch {
                expected: self.m,
                got: code.len(),
            });
        }
        if let Some(&c) = code.iter().find(|&&c| c >= 16) {
            return Err(Error::InvalidArgument(format!(
                "4-bit code {c} out of range"
            )));
        }
        let i = self.ntotal % BBS;
        if i == 0 {
            let grow = self.data.len() + self.block_bytes();
            self.data.to_mut().resize(grow, 0);
        }
        let bb = self.block_bytes();
        let start = self.data.len() - bb;
        let block = &mut self.data.to_mut()[start..];
        for (j, &c) in code.iter().enumerate() {
            set_code_at(block, i, j, c);
        }
        self.ntotal += 1;
        Ok(())
    }

    /// Code of vector `i`, sub-quantizer `j`. Panics if out of range.
    pub fn get(&self, i: usize, j: usize) -> u8 {
        assert!(i < self.ntotal && j < self.m, "packed element out of range");
        let bb = self.block_bytes();
        code_at(&self.data[(i / BBS) * bb..(i / BBS + 1) * bb], i % BBS, j)
    }

    /// Sets the code of vector `i`, sub-quantizer `j` (`code < 16`). Panics if out of range.
    pub fn set(&mut self, i: usize, j: usize, code: u8) {
        assert!(
            i < self.ntotal && j < self.m && code < 16,
            "packed element out of range"
        );
        let bb = self.block_bytes();
        set_code_at(
            &mut self.data.to_mut()[(i / BBS) * bb..(i / BBS + 1) * bb],
            i % BBS,
            j,
            code,
        );
    }

    /// The `m` codes of vector `i`.
    pub fn code(&self, i: usize) -> Vec<u8> {
        (0..self.m).map(|j| self.get(i, j)).collect()
    }

    /// Removes every vector.
    pub fn clear(&mut self) {
        self.ntotal = 0;
        self.data = Buf::new();
    }
}

/// Packs `n * m` unpacked codes (one byte per sub-quantizer, each `< 16`).
pub fn pack_codes(codes: &[u8], m: usize) -> Result<PackedCodes> {
    let mut p = PackedCodes::new(m)?;
    if !codes.len().is_multiple_of(m) {
        return Err(Error::rows("codes", codes.len(), m));
    }
    let want = codes.len() / m / BBS * p.block_bytes() + p.block_bytes();
    p.data.to_mut().reserve(want);
    for code in codes.chunks_exact(m) {
        p.push(code)?;
    }
    Ok(p)
}

/// Unpacks into `ntotal * m` bytes, one code per byte.
pub fn unpack_codes(p: &PackedCodes) -> Vec<u8> {
    (0..p.ntotal).flat_map(|i| p.code(i)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_unpack_round_trip_for_odd_and_even_m() {
        for m in [1usize, 2, 3, 16, 17, 64] {
            for n in [0usize, 1, 31, 32, 33, 70] {
                let codes: Vec<u8> = (0..n * m).map(|x| ((x * 7 + x / 5) % 16) as u8).collect();
                let p = pack_codes(&codes, m).unwrap();
                assert_eq!(p.nblocks(), n.div_ceil(32));
                assert_eq!(p.data().len(), p.nblocks() * p.block_bytes());
                assert_eq!(unpack_codes(&p), codes, "m {m} n {n}");
            }
        }
    }

    #[test]
    fn set_changes_exactly_one_element() {
        let codes: Vec<u8> = (0..40 * 5).map(|x| (x % 16) as u8).collect();
        let mut p = pack_codes(&codes, 5).unwrap();
        p.set(33, 4, 9);
        let mut want = codes.clone();
        want[33 * 5 + 4] = 9;
        assert_eq!(unpack_codes(&p), want);
    }

    #[test]
    fn bad_codes_are_rejected() {
        assert!(PackedCodes::new(0).is_err());
        assert!(PackedCodes::new(257).is_err());
        assert!(pack_codes(&[1, 2, 16], 3).is_err());
        assert!(pack_codes(&[1, 2, 3, 4], 3).is_err());
    }
}
