//! [`Buf`]: a vector that is either owned or a zero-copy view of a memory-mapped file.
//!
//! Indexes keep their bulk arrays (codes, ids, stored vectors) in `Buf`s. An index opened
//! with [`crate::io::file::open`] reads its arrays straight from the mapping; the first
//! mutation of an array (an `add`, a removal) copies that array into owned memory ([`Buf::to_mut`],
//! copy on write) and leaves the others mapped. Cloning a mapped `Buf` shares the mapping.

use bytemuck::Pod;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

/// A read-only mapped file.
pub type Mapping = Arc<memmap2::Mmap>;

/// Owned or mapped elements of type `T`.
#[derive(Clone)]
pub enum Buf<T: Pod> {
    /// Elements in owned memory.
    Owned(Vec<T>),
    /// `len` elements of a mapping from byte `start` (validated: in bounds and aligned for
    /// `T`, checked by [`Buf::mapped`]).
    Mapped {
        /// The mapping.
        map: Mapping,
        /// Byte offset.
        start: usize,
        /// Element count.
        len: usize,
    },
}

impl<T: Pod> Buf<T> {
    /// An empty owned buffer.
    pub fn new() -> Buf<T> {
        Buf::Owned(Vec::new())
    }

    /// A view of `len` elements of `map` from byte `start`; `None` if out of bounds or not
    /// aligned for `T`.
    pub fn mapped(map: &Mapping, start: usize, len: usize) -> Option<Buf<T>> {
        let bytes = len.checked_mul(std::mem::size_of::<T>())?;
        let end = start.checked_add(bytes)?;
        let slice = map.get(start..end)?;
        bytemuck::try_cast_slice::<u8, T>(slice).ok()?;
        Some(Buf::Mapped {
            map: Arc::clone(map),
            start,
            len,
        })
    }

    /// Whether the elements live in a mapping.
    pub fn is_mapped(&self) -> bool {
        matches!(self, Buf::Mapped { .. })
    }

    /// The elements as a slice.
    pub fn as_slice(&self) -> &[T] {
        match self {
            Buf::Owned(v) => v,
            Buf::Mapped { map, start, len } => {
                let bytes = &map[*start..*start + *len * std::mem::size_of::<T>()];
                // Bounds and alignment were checked in `Buf::mapped`, and a mapping never
                // moves: this cast cannot fail.
                bytemuck::cast_slice(bytes)
            }
        }
    }

    /// Keeps, in order, the rows of `row_len` elements whose flag in `keep` is set (one
    /// flag per row); the buffer becomes owned, holding just those rows.
    pub fn retain_rows(&mut self, row_len: usize, keep: &[bool]) {
        let kept: Vec<T> = self
            .as_slice()
            .chunks_exact(row_len.max(1))
            .zip(keep)
            .filter(|(_, &k)| k)
            .flat_map(|(row, _)| row.iter().copied())
            .collect();
        *self = Buf::Owned(kept);
    }

    /// The owned vector, copying a mapped buffer first (copy on write).
    pub fn to_mut(&mut self) -> &mut Vec<T> {
        if let Buf::Mapped { .. } = self {
            *self = Buf::Owned(self.as_slice().to_vec());
        }
        match self {
            Buf::Owned(v) => v,
            Buf::Mapped { .. } => unreachable!("converted above"),
        }
    }
}

impl<T: Pod> Default for Buf<T> {
    fn default() -> Self {
        Buf::new()
    }
}

impl<T: Pod> From<Vec<T>> for Buf<T> {
    fn from(v: Vec<T>) -> Self {
        Buf::Owned(v)
    }
}

impl<T: Pod> Deref for Buf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        self.as_slice()
    }
}

impl<T: Pod + PartialEq> PartialEq for Buf<T> {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl<T: Pod + Eq> Eq for Buf<T> {}

impl<T: Pod + fmt::Debug> fmt::Debug for Buf<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.is_mapped() { "mapped" } else { "owned" };
        write!(f, "Buf({kind}, {} elements)", self.len())
    }
}
