//! NumPy `.npy` files, format versions 1.0, 2.0 and 3.0, little-endian, C order.
//!
//! Layout: the 6-byte magic `\x93NUMPY`, major and minor version bytes, the header length
//! (u16 LE in 1.0, u32 LE in 2.0 and 3.0), an ASCII (UTF-8 in 3.0) Python dict literal
//! `{'descr': '<f4', 'fortran_order': False, 'shape': (r, c), }` padded with spaces to a
//! multiple of 64 bytes, then the raw data. Supported `descr`: `<f4`, `<f2`, `<f8` (read as
//! f32), `<i8`, `<i4` (read as i64).

use crate::error::{Error, Result};
use half::f16;
use std::path::Path;

const MAGIC: &[u8] = b"\x93NUMPY";

/// The values of an array.
#[derive(Clone, Debug, PartialEq)]
pub enum NpyData {
    /// `<f4` (and `<f8`, narrowed).
    F32(Vec<f32>),
    /// `<f2`.
    F16(Vec<f16>),
    /// `<i8` (and `<i4`, widened).
    I64(Vec<i64>),
}

impl NpyData {
    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            NpyData::F32(v) => v.len(),
            NpyData::F16(v) => v.len(),
            NpyData::I64(v) => v.len(),
        }
    }

    /// Whether there are no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `len` values from `offset`, converted to f32.
    pub fn to_f32_range(&self, offset: usize, len: usize) -> Vec<f32> {
        match self {
            NpyData::F32(v) => v[offset..offset + len].to_vec(),
            NpyData::F16(v) => v[offset..offset + len].iter().map(|x| x.to_f32()).collect(),
            NpyData::I64(v) => v[offset..offset + len].iter().map(|&x| x as f32).collect(),
        }
    }
}

/// A parsed array.
#[derive(Clone, Debug, PartialEq)]
pub struct NpyArray {
    /// Shape, outermost first.
    pub shape: Vec<usize>,
    /// Values in C order.
    pub data: NpyData,
}

/// Reads an `.npy` file.
pub fn read(path: &Path) -> Result<NpyArray> {
    let bytes = super::read_regular(path).map_err(|e| Error::io(path, e))?;
    parse(&bytes).map_err(|reason| Error::format(path, reason))
}

/// Parses `.npy` bytes.
pub fn parse(bytes: &[u8]) -> std::result::Result<NpyArray, String> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err("not a .npy file (bad magic)".into());
    }
    let major = bytes[6];
    let (header_len, header_start) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10usize),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err("truncated header".into());
            }
            (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            )
        }
        v => return Err(format!("unsupported .npy version {v}")),
    };
    let data_start = header_start
        .checked_add(header_len)
        .filter(|&e| e <= bytes.len())
        .ok_or("truncated header")?;
    let header = std::str::from_utf8(&bytes[header_start..data_start])
        .map_err(|_| "header is not valid text")?;
    let descr = dict_value(header, "descr").ok_or("header has no 'descr'")?;
    let descr = descr.trim_matches(|c| c == '\'' || c == '"');
    let fortran = dict_value(header, "fortran_order").ok_or("header has no 'fortran_order'")?;
    if fortran.trim() != "False" {
        return Err("Fortran-order arrays are not supported (save with C order)".into());
    }
    let shape_text = dict_value(header, "shape").ok_or("header has no 'shape'")?;
    let shape: Vec<usize> = shape_text
        .trim()
        .trim_start_matches('(')
        .trim_end_matches(')')
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| format!("bad shape entry {s:?}"))
        })
        .collect::<std::result::Result<_, _>>()?;
    let count = shape
        .iter()
        .try_fold(1usize, |a, &b| a.checked_mul(b))
        .ok_or("shape overflows")?;
    let raw = &bytes[data_start..];
    let width = match descr {
        "<f4" | "<i4" => 4,
        "<f2" => 2,
        "<f8" | "<i8" => 8,
        "|u1" | "<u1" => 1,
        other => {
            return Err(format!(
                "unsupported dtype {other:?} (expected <f4, <f2, <f8, <i8 or <i4)"
            ))
        }
    };
    let need = count.checked_mul(width).ok_or("shape overflows")?;
    if raw.len() != need {
        return Err(format!(
            "data is {} bytes, shape {:?} of {descr} needs {need}",
            raw.len(),
            shape
        ));
    }
    let data = match descr {
        "<f4" => NpyData::F32(
            raw.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        ),
        "<f8" => NpyData::F32(
            raw.chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
                .collect(),
        ),
        "<f2" => NpyData::F16(
            raw.chunks_exact(2)
                .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
        ),
        "<i8" => NpyData::I64(
            raw.chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        ),
        "<i4" => NpyData::I64(
            raw.chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
                .collect(),
        ),
        _ => NpyData::F32(raw.iter().map(|&b| b as f32).collect()),
    };
    Ok(NpyArray { shape, data })
}

/// The text of `key`'s value in a Python dict literal (up to the next top-level comma).
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let pat_a = format!("'{key}'");
    let pat_b = format!("\"{key}\"");
    let at = header
        .find(&pat_a)
        .map(|i| i + pat_a.len())
        .or_else(|| header.find(&pat_b).map(|i| i + pat_b.len()))?;
    let rest = header[at..].trim_start().strip_prefix(':')?.trim_start();
    let mut depth = 0i32;
    for (i, c) in rest.char_indices() {
        match c {
            '(' | '[' => depth += 1,
            ')' | ']' => depth -= 1,
            ',' | '}' if depth == 0 => return Some(&rest[..i]),
            _ => {}
        }
        if depth < 0 {
            return None;
        }
    }
    None
}

/// Serialises an array as `.npy` 1.0 bytes (`<f4`, `<f2` or `<i8`).
pub fn to_bytes(shape: &[usize], data: &NpyData) -> Vec<u8> {
    let descr = match data {
        NpyData::F32(_) => "<f4",
        NpyData::F16(_) => "<f2",
        NpyData::I64(_) => "<i8",
    };
    let shape_text = match shape {
        [one] => format!("({one},)"),
        s => format!(
            "({})",
            s.iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header =
        format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_text}, }}");
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + data.len() * 4);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    match data {
        NpyData::F32(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        NpyData::F16(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_bits().to_le_bytes())),
        NpyData::I64(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
    }
    out
}

/// Writes an array as `.npy`.
pub fn write(path: &Path, shape: &[usize], data: &NpyData) -> Result<()> {
    std::fs::write(path, to_bytes(shape, data)).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_each_dtype() {
        let cases = [
            (
                vec![2, 3],
                NpyData::F32(vec![1.0, -2.5, 3.0, 4.0, 5.0, 6.0]),
            ),
            (
                vec![3],
                NpyData::F16(vec![f16::from_f32(0.5), f16::ONE, f16::MAX]),
            ),
            (vec![1, 2], NpyData::I64(vec![-1, i64::MAX])),
        ];
        for (shape, data) in cases {
            let bytes = to_bytes(&shape, &data);
            let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
            assert_eq!((10 + header_len) % 64, 0, "data must start 64-byte aligned");
            let back = parse(&bytes).unwrap();
            assert_eq!(back.shape, shape);
            assert_eq!(back.data, data);
        }
    }

    #[test]
    fn truncations_and_garbage_are_errors() {
        let bytes = to_bytes(&[4, 4], &NpyData::F32(vec![1.0; 16]));
        for len in 0..bytes.len() {
            assert!(parse(&bytes[..len]).is_err(), "truncated to {len} parsed");
        }
        let mut bad = bytes.clone();
        bad[6] = 9;
        assert!(parse(&bad).unwrap_err().contains("version"));
        let text = String::from_utf8_lossy(&bytes[10..74]).replace("<f4", "<c8");
        let mut bad = bytes[..10].to_vec();
        bad.extend_from_slice(text.as_bytes());
        bad.extend_from_slice(&bytes[74..]);
        assert!(parse(&bad).unwrap_err().contains("unsupported dtype"));
    }
}
