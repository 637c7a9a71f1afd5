//! [`StreamingIndex`]: one index shared by threads that search it and threads that grow it,
//! with codebook refresh in the background.
//!
//! **Concurrency model.** The index sits behind a reader-writer lock:
//!
//! * `search` holds the read lock for the duration of its scan; any number run at once.
//! * `add` / `add_with_ids` / `remove_ids` hold the write lock only for their append (`O(m)`
//!   per vector after encoding, never a repack of the index) or tombstoning, so a search
//!   waits at most for one such short batch (and for the searches queued before it).
//! * `refresh` never holds a lock while it works: it copies the live vectors under the read
//!   lock, re-trains and re-encodes the copy with no lock held (rayon), while searches and
//!   adds go on against the old index and every add / remove is also written to a log; then,
//!   under the write lock, it replays the log onto the new index and swaps it in. A search
//!   sees either the old index or the new one, with every id present in both.
//!
//! Ids are stable across refreshes and compactions. A [`RefreshPolicy`] starts a background
//! refresh from `add` once the drift ([`IndexIVFPQFastScan::drift`]) passes its threshold.

use super::ivf::{DriftStats, IndexIVFPQFastScan};
use super::Index;
use crate::error::{Error, Result};
use crate::result::SearchResult;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;

/// When to re-train on its own.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RefreshPolicy {
    /// Refresh once the drift ratio (error of recent vectors / training error) exceeds this.
    pub drift_threshold: f64,
    /// ... and at least this many vectors were added since the last training.
    pub min_added: usize,
}

impl Default for RefreshPolicy {
    fn default() -> Self {
        RefreshPolicy {
            drift_threshold: 1.25,
            min_added: 4096,
        }
    }
}

/// An operation made while a refresh was running, replayed onto the refreshed index.
enum LogOp {
    /// `add_auto` / `add_with_ids`: the vectors and the ids they were given.
    Add {
        x: Vec<f32>,
        ids: Vec<i64>,
    },
    /// [`Index::add`]: the index chose the ids; a replay in log order chooses the same ones
    /// (ids continue from the largest so far, which a refresh keeps).
    AddOwn(Vec<f32>),
    Remove(Vec<i64>),
}

struct Shared<I> {
    index: RwLock<I>,
    /// `Some` while a refresh runs.
    log: Mutex<Option<Vec<LogOp>>>,
    refreshing: AtomicBool,
    refreshes: AtomicUsize,
    policy: Mutex<Option<RefreshPolicy>>,
    last_error: Mutex<Option<String>>,
}

/// A thread-safe handle to an index; clones share it.
pub struct StreamingIndex<I> {
    shared: Arc<Shared<I>>,
}

impl<I> Clone for StreamingIndex<I> {
    fn clone(&self) -> Self {
        StreamingIndex {
            shared: Arc::clone(&self.shared),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere never leaves these values half-updated: recover the guard.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<I: Index + Clone + 'static> StreamingIndex<I> {
    /// Shares `index`.
    pub fn new(index: I) -> StreamingIndex<I> {
        StreamingIndex {
            shared: Arc::new(Shared {
                index: RwLock::new(index),
                log: Mutex::new(None),
                refreshing: AtomicBool::new(false),
                refreshes: AtomicUsize::new(0),
                policy: Mutex::new(None),
                last_error: Mutex::new(None),
            }),
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, I> {
        self.shared.index.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, I> {
        self.shared.index.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Searches the current index.
    pub fn search(&self, queries: &[f32], k: usize) -> Result<SearchResult> {
        self.read().search(queries, k)
    }

    /// Number of live vectors.
    pub fn ntotal(&self) -> usize {
        self.read().ntotal()
    }

    /// Runs `f` on the current index under the read lock.
    pub fn with<R>(&self, f: impl FnOnce(&I) -> R) -> R {
        f(&self.read())
    }

    /// A copy of the current index.
    pub fn snapshot(&self) -> I {
        self.read().clone()
    }

    /// Adds `x` with the index's own ids (see [`Index::add`]). Logged like every other add:
    /// a refresh running meanwhile replays it onto the index it swaps in.
    pub fn add(&self, x: &[f32]) -> Result<()> {
        let mut g = self.write();
        g.add(x)?;
        if let Some(log) = lock(&self.shared.log).as_mut() {
            log.push(LogOp::AddOwn(x.to_vec()));
        }
        Ok(())
    }
}

impl StreamingIndex<IndexIVFPQFastScan> {
    /// Sets (or clears) the automatic refresh policy.
    pub fn set_policy(&self, policy: Option<RefreshPolicy>) {
        *lock(&self.shared.policy) = policy;
    }

    /// Adds `x` with ids continuing from the largest id so far; returns the ids given.
    pub fn add_auto(&self, x: &[f32]) -> Result<Vec<i64>> {
        let ids = {
            let mut g = self.write();
            let d = g.dim();
            let n = x.len() / d.max(1);
            let first = g.next_id();
            let end = i64::try_from(n)
                .ok()
                .and_then(|n| first.checked_add(n))
                .ok_or_else(|| Error::InvalidArgument("ids would overflow".into()))?;
            let ids: Vec<i64> = (first..end).collect();
            self.apply_add(&mut g, x, &ids)?;
            ids
        };
        self.maybe_refresh();
        Ok(ids)
    }

    /// Adds `x` with explicit ids.
    pub fn add_with_ids(&self, x: &[f32], ids: &[i64]) -> Result<()> {
        {
            let mut g = self.write();
            self.apply_add(&mut g, x, ids)?;
        }
        self.maybe_refresh();
        Ok(())
    }

    fn apply_add(&self, g: &mut IndexIVFPQFastScan, x: &[f32], ids: &[i64]) -> Result<()> {
        g.add_with_ids(x, ids)?;
        if let Some(log) = lock(&self.shared.log).as_mut() {
            log.push(LogOp::Add {
                x: x.to_vec(),
                ids: ids.to_vec(),
            });
        }
        Ok(())
    }

    /// Removes the vectors with these ids; returns how many were removed.
    pub fn remove_ids(&self, ids: &[i64]) -> usize {
        let mut g = self.write();
        let removed = g.remove_ids(ids);
        if let Some(log) = lock(&self.shared.log).as_mut() {
            log.push(LogOp::Remove(ids.to_vec()));
        }
        removed
    }

    /// Drift statistics of the current index.
    pub fn drift(&self) -> DriftStats {
        self.read().drift()
    }

    /// Completed refreshes.
    pub fn refreshes(&self) -> usize {
        self.shared.refreshes.load(Ordering::SeqCst)
    }

    /// The error of the last failed background refresh, if any.
    pub fn last_refresh_error(&self) -> Option<String> {
        lock(&self.shared.last_error).clone()
    }

    /// Whether a refresh is running.
    pub fn is_refreshing(&self) -> bool {
        self.shared.refreshing.load(Ordering::SeqCst)
    }

    /// Re-trains and re-encodes (see [`IndexIVFPQFastScan::refreshed`]) without blocking
    /// searches or adds for the duration of the work, then swaps the result in. Errors if
    /// another refresh is running.
    pub fn refresh(&self) -> Result<()> {
        if self.shared.refreshing.swap(true, Ordering::SeqCst) {
            return Err(Error::InvalidArgument(
                "a refresh is already running".into(),
            ));
        }
        let out = self.refresh_inner();
        *lock(&self.shared.log) = None;
        self.shared.refreshing.store(false, Ordering::SeqCst);
        out
    }

    fn refresh_inner(&self) -> Result<()> {
        let snapshot = {
            let g = self.read();
            // Under the read lock no add is in flight: the log starts exactly at the snapshot.
            *lock(&self.shared.log) = Some(Vec::new());
            g.clone()
        };
        let mut fresh = snapshot.refreshed()?;
        drop(snapshot);
        let mut g = self.write();
        let log = lock(&self.shared.log).take().unwrap_or_default();
        for op in log {
            match op {
                LogOp::Add { x, ids } => fresh.add_with_ids(&x, &ids)?,
                LogOp::AddOwn(x) => fresh.add(&x)?,
                LogOp::Remove(ids) => {
                    fresh.remove_ids(&ids);
                }
            }
        }
        fresh.nprobe = g.nprobe;
        fresh.rerank_factor = g.rerank_factor;
        *g = fresh;
        self.shared.refreshes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Starts a refresh on a background thread; `None` if one is already running.
    pub fn refresh_in_background(&self) -> Option<JoinHandle<Result<()>>> {
        if self.is_refreshing() {
            return None;
        }
        let me = self.clone();
        Some(std::thread::spawn(move || {
            let out = me.refresh();
            if let Err(e) = &out {
                *lock(&me.shared.last_error) = Some(e.to_string());
            }
            out
        }))
    }

    fn maybe_refresh(&self) {
        let Some(policy) = *lock(&self.shared.policy) else {
            return;
        };
        let drift = self.drift();
        let due = drift.added >= policy.min_added
            && drift.ratio().is_some_and(|r| r > policy.drift_threshold);
        if due {
            // A running refresh answers None; its result carries the newer data anyway.
            let _ = self.refresh_in_background();
        }
    }
}
