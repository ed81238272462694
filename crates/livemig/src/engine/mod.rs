//! The migration engine: the source state machine ([`Source`]) and the
//! destination ([`Destination`], built on the [`Loader`]), over any guest
//! memory, tracker and byte transport.

mod abort;
mod ack;
mod channels;
mod converge;
mod destination;
pub(crate) mod digest;
mod fresh;
mod handle;
mod loader;
pub mod local;
mod pacing;
mod params;
pub mod postcopy;
mod prefault;
mod priority;
mod search;
mod shrink;
mod source;
mod stats;

pub use ack::{
    read_go, read_reply, write_go, write_reply, AckError, Commit, CommitError, Go, LoadReport,
    PeerReason, Reply, ReplyError, GO_LEN, REPLY_HEAD_LEN,
};
pub use channels::ChannelWriter;
pub use destination::{Arrival, Destination, DestinationError};
pub use digest::{hex, memory_digest};
pub use handle::{HandleEvent, MigrationHandle, Observer, PostcopyPoint, SyncPoint};
pub use loader::{LayoutMismatch, LoadError, LoadOutcome, LoadStats, Loader, PostcopyLoadError};
pub use pacing::{PauseEstimate, HANDSHAKE_ALLOWANCE};
pub use params::{CompressParams, MigrationMode, Params, ParamsError, Switchover};
pub use priority::{pause_priority_enabled, PAUSE_NICE};
pub use source::Source;
pub use stats::{
    CompressionStats, Convergence, MigrationStats, PauseBreakdown, RamStats, Status, XbzrleStats,
};

use crate::dirty::DirtyError;

/// Why an outgoing migration stopped. Tracking has stopped in every case;
/// the source guest runs on (it is resumed if it had been paused), except
/// after [`MigrationError::Unconfirmed`], when it stays paused.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// Cancelled by the user.
    #[error("migration cancelled")]
    Cancelled,
    /// Invalid parameters.
    #[error("invalid migration parameter: {0}")]
    Params(#[from] ParamsError),
    /// The dirty tracker failed.
    #[error(transparent)]
    Tracker(#[from] DirtyError),
    /// Writing to the transport failed (connection dropped, disk full...).
    #[error("sending the stream failed: {0}")]
    Send(#[source] std::io::Error),
    /// The VMM could not pause, resume or save state.
    #[error(transparent)]
    Vm(#[from] crate::vm::VmError),
    /// The destination's reply was missing or malformed, or GO could not be
    /// sent: the destination was not told to start, the source resumed.
    #[error(transparent)]
    Ack(#[from] ack::AckError),
    /// The destination refused the migration at setup (memory layout,
    /// vCPU count, version or features), before any page was sent; the
    /// reason is the destination's.
    #[error("the destination refused the migration before any page was sent: {0}")]
    Refused(#[source] ack::PeerReason),
    /// GO was sent but STARTED did not come back: the destination may be
    /// running the guest, so the source keeps it paused.
    #[error("the destination was told to start the guest (GO sent) but did not confirm ({0}): it may be running it, so the source guest stays paused; resume it here only if you know the destination is not running it")]
    Unconfirmed(#[source] ack::ReplyError),
    /// Postcopy failed after the switch (the guest stays paused here: the
    /// destination has been running it).
    #[error("postcopy: {0}")]
    Postcopy(#[from] postcopy::PostcopyError),
    /// Verify mode: after the destination took over, the source's memory
    /// at stop time did not match the digest sent in the stream (the dirty
    /// tracker missed a write). The source guest stays paused.
    #[error("verify after the switch-over failed: memory {at_stop} at stop time, but {sent} was sent: the dirty tracker missed a write, and the destination runs the guest with that difference")]
    Verify {
        /// Digest of all memory at stop time (hex).
        at_stop: String,
        /// Digest sent in the stream (hex).
        sent: String,
    },
    /// The destination reported a failure (its reason).
    #[error("destination failed to load: {0}")]
    Destination(#[source] ack::PeerReason),
    /// A local migration could not hand the memory over.
    #[error(transparent)]
    Local(#[from] local::LocalError),
}

impl MigrationError {
    pub(crate) fn send(e: std::io::Error) -> Self {
        MigrationError::Send(e)
    }
}

#[cfg(test)]
mod downtime_tests;
#[cfg(test)]
mod tests;
