//! Dirty-page tracking: which guest pages were written since the last look.
//!
//! Two families of backend sit behind [`DirtyTracker`]:
//! - *returns and resets*: each [`DirtyTracker::sync`] reports the pages
//!   written since the previous one and re-protects them (KVM's classic
//!   dirty bitmap, the KVM dirty ring, userfaultfd write-protect);
//! - *manual clear*: `sync` reports without re-protecting and the engine
//!   calls [`DirtyTracker::clear`] on a chunk just before it sends the
//!   chunk's first page (KVM manual-protect, optionally initially set).

use crate::bitmap::DirtyBitmap;

pub mod device;
pub use device::{DeviceWrites, WithDeviceWrites};
#[cfg(feature = "kvm")]
pub mod kvm;
pub mod software;
pub use software::{SoftwareLog, SoftwareTracker};
pub mod uffd;
pub use uffd::{UffdMode, UffdSupport, UffdTracker};
#[cfg(test)]
pub(crate) mod suite;

/// Errors of dirty tracking backends.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// The backend is not offered by this kernel or device.
    #[error("dirty tracker '{tracker}' is not available here: {why}")]
    Unavailable {
        /// Backend name.
        tracker: &'static str,
        /// What is missing.
        why: String,
    },
    /// A system call failed.
    #[error("dirty tracker '{tracker}': {op} failed: {source}")]
    Os {
        /// Backend name.
        tracker: &'static str,
        /// The operation (ioctl or syscall) that failed.
        op: &'static str,
        /// OS error.
        source: std::io::Error,
    },
    /// The caller passed bitmaps or ranges that do not match the memory.
    #[error("dirty tracker '{tracker}': {what}")]
    Mismatch {
        /// Backend name.
        tracker: &'static str,
        /// What did not match.
        what: String,
    },
    /// Called in the wrong state (sync before start, start twice, ...).
    #[error("dirty tracker '{tracker}': {what}")]
    State {
        /// Backend name.
        tracker: &'static str,
        /// What was wrong.
        what: &'static str,
    },
}

/// How tracking began.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrackerStart {
    /// The log starts with every page dirty and nothing protected (KVM
    /// `KVM_DIRTY_LOG_INITIALLY_SET`): the engine skips its first sync and
    /// arms protection lazily through [`DirtyTracker::clear`].
    pub initially_set: bool,
}

/// A dirty-page tracker over the RAM blocks of one guest memory, in the
/// same block order.
pub trait DirtyTracker: Send {
    /// Short backend name for logs and stats ("uffd-wp-async", "kvm-bitmap").
    fn name(&self) -> &'static str;

    /// Starts tracking: from here on every write is recorded.
    fn start(&mut self) -> Result<TrackerStart, DirtyError>;

    /// ORs the pages written since the previous sync into `bitmaps` (one
    /// per block) and returns how many pages the backend reported.
    /// Returns-and-resets backends re-protect what they report.
    fn sync(&mut self, bitmaps: &mut [DirtyBitmap]) -> Result<u64, DirtyError>;

    /// For manual-clear backends: log2 of the pages per clear chunk. `None`
    /// means the backend re-protects in `sync` and `clear` is never needed.
    fn clear_chunk_shift(&self) -> Option<u32> {
        None
    }

    /// Re-protects pages `[first_page, first_page + count)` of `block` that
    /// the backend has reported (or, initially set, all of them), so later
    /// writes are seen again. Called just before those pages are sent.
    fn clear(&mut self, block: usize, first_page: u64, count: u64) -> Result<(), DirtyError> {
        let _ = (block, first_page, count);
        Ok(())
    }

    /// Stops tracking and drops all protection. Idempotent.
    fn stop(&mut self) -> Result<(), DirtyError>;
}

impl<T: DirtyTracker + ?Sized> DirtyTracker for Box<T> {
    fn name(&self) -> &'static str {
        (**self).name()
    }
    fn start(&mut self) -> Result<TrackerStart, DirtyError> {
        (**self).start()
    }
    fn sync(&mut self, bitmaps: &mut [DirtyBitmap]) -> Result<u64, DirtyError> {
        (**self).sync(bitmaps)
    }
    fn clear_chunk_shift(&self) -> Option<u32> {
        (**self).clear_chunk_shift()
    }
    fn clear(&mut self, block: usize, first_page: u64, count: u64) -> Result<(), DirtyError> {
        (**self).clear(block, first_page, count)
    }
    fn stop(&mut self) -> Result<(), DirtyError> {
        (**self).stop()
    }
}
