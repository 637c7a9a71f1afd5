//! `.fvecs` / `.ivecs`: a sequence of records, each a little-endian i32 dimension `d` followed
//! by `d` little-endian f32 (fvecs) or i32 (ivecs) values. Every record must have the same `d`.

use crate::error::{Error, Result};
use std::path::Path;

fn read_records(path: &Path) -> Result<(usize, usize, Vec<[u8; 4]>)> {
    let bytes = super::read_regular(path).map_err(|e| Error::io(path, e))?;
    if bytes.is_empty() {
        return Ok((0, 0, Vec::new()));
    }
    if bytes.len() < 4 {
        return Err(Error::format(
            path,
            "truncated: shorter than one dimension field",
        ));
    }
    let d = i32::from_le_bytes(bytes[..4].try_into().unwrap());
    if d <= 0 || d > 1 << 20 {
        return Err(Error::format(path, format!("implausible dimension {d}")));
    }
    let d = d as usize;
    let rec = 4 * (d + 1);
    if bytes.len() % rec != 0 {
        return Err(Error::format(
            path,
            format!(
                "length {} is not a multiple of the record size {rec} (d = {d})",
                bytes.len()
            ),
        ));
    }
    let n = bytes.len() / rec;
    let mut out = Vec::with_capacity(n * d);
    for (i, r) in bytes.chunks_exact(rec).enumerate() {
        let di = i32::from_le_bytes(r[..4].try_into().unwrap());
        if di as usize != d {
            return Err(Error::format(
                path,
                format!("record {i} has dimension {di}, expected {d}"),
            ));
        }
        out.extend(
            r[4..]
                .chunks_exact(4)
                .map(|c| <[u8; 4]>::try_from(c).unwrap()),
        );
    }
    Ok((n, d, out))
}

/// Reads an `.fvecs` file as `(rows, dim, values)`.
pub fn read_fvecs(path: &Path) -> Result<(usize, usize, Vec<f32>)> {
    let (n, d, raw) = read_records(path)?;
    Ok((n, d, raw.into_iter().map(f32::from_le_bytes).collect()))
}

/// Reads an `.ivecs` file as `(rows, dim, values)`.
pub fn read_ivecs(path: &Path) -> Result<(usize, usize, Vec<i32>)> {
    let (n, d, raw) = read_records(path)?;
    Ok((n, d, raw.into_iter().map(i32::from_le_bytes).collect()))
}

/// Writes rows of `dim` f32 values as `.fvecs`.
pub fn write_fvecs(path: &Path, dim: usize, data: &[f32]) -> Result<()> {
    let mut out = Vec::with_capacity(data.len() * 4 + data.len() / dim.max(1) * 4);
    for row in data.chunks_exact(dim.max(1)) {
        out.extend_from_slice(&(dim as i32).to_le_bytes());
        row.iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
    }
    std::fs::write(path, out).map_err(|e| Error::io(path, e))
}
