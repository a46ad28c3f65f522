//! The ingest pipeline's health as `/readyz` reads it.

use std::sync::atomic::{AtomicBool, Ordering};

use super::reach::Reach;

/// Shared view of the ingest pipeline's health, read by `/readyz`.
#[derive(Debug)]
pub struct IngestStatus {
    pub(super) sources: Vec<AtomicBool>,
    pub(super) store_ok: AtomicBool,
    /// Which clusters answer now, and since when.
    pub reach: Reach,
}

impl IngestStatus {
    /// Status for `clusters` sources, none ready yet.
    pub fn new(clusters: usize) -> Self {
        Self {
            sources: (0..clusters).map(|_| AtomicBool::new(false)).collect(),
            store_ok: AtomicBool::new(true),
            reach: Reach::default(),
        }
    }

    /// Whether every cluster has listed its audit partitions and the last write to the
    /// store succeeded.
    pub fn is_ready(&self) -> bool {
        self.store_ok.load(Ordering::Relaxed)
            && self.sources.iter().all(|s| s.load(Ordering::Relaxed))
    }
}
