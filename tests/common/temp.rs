//! Temporary files and folders that tests remove when they are done with them.
//!
//! Shared by path with `llm/tests` (`#[path = ...]`): the two test crates cannot share a
//! module otherwise.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A folder of its own under the system's temporary folder, removed (with everything in it)
/// when dropped: `pqcache-{name}-{process id}-{sequence}`, so tests running in parallel, or
/// two runs at once, never share one.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let seq = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("pqcache-{name}-{}-{seq}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A path named `file` inside a [`TempDir`] of its own: the file (whatever a test writes
/// there, and any sibling such as an interrupted save's temporary) goes when this is dropped.
#[derive(Debug)]
pub struct TempPath {
    path: PathBuf,
    _dir: TempDir,
}

impl TempPath {
    pub fn new(name: &str, file: &str) -> TempPath {
        let dir = TempDir::new(name);
        TempPath {
            path: dir.join(file),
            _dir: dir,
        }
    }
}

impl std::ops::Deref for TempPath {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<Path> for TempPath {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}
