//! What a user reads about a migration, in the shape of QEMU's query-migrate.

use serde::{Deserialize, Serialize};

/// Where a migration is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// Not started.
    #[default]
    None,
    /// Setting up (bitmaps, tracking, block list).
    Setup,
    /// Iterating: guest running, pages flowing.
    Active,
    /// Stop-and-copy: guest paused, last pages and device state.
    Device,
    /// Postcopy: the guest runs on the destination, which fetches the
    /// pages it lacks while the source pushes the rest.
    PostcopyActive,
    /// Postcopy with the connection lost: both sides wait (recovery).
    PostcopyPaused,
    /// Postcopy reconnecting after a loss.
    PostcopyRecover,
    /// Done; the destination has everything.
    Completed,
    /// Failed; the source guest runs on.
    Failed,
    /// Cancelled; the source guest runs on.
    Cancelled,
}

impl Status {
    /// True once the migration can no longer change.
    pub fn is_final(self) -> bool {
        matches!(self, Status::Completed | Status::Failed | Status::Cancelled)
    }
}

/// RAM figures.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RamStats {
    /// Bytes written to the stream so far.
    pub transferred: u64,
    /// Bytes still marked dirty.
    pub remaining: u64,
    /// Guest RAM size.
    pub total: u64,
    /// Pages sent as zero pages.
    pub duplicate: u64,
    /// Pages found dirty but unchanged (XBZRLE), not sent.
    pub skipped: u64,
    /// Pages sent in full (raw or compressed).
    pub normal: u64,
    /// Bytes of pages sent in full.
    pub normal_bytes: u64,
    /// Dirty pages per second, measured at the last sync.
    pub dirty_pages_rate: u64,
    /// Throughput in megabits per second over the last period.
    pub mbps: f64,
    /// Number of syncs with the dirty tracker.
    pub dirty_sync_count: u64,
    /// Pages sent per second over the last period.
    pub pages_per_second: u64,
    /// Bytes sent while the guest ran.
    pub precopy_bytes: u64,
    /// Bytes sent while the guest was paused.
    pub downtime_bytes: u64,
    /// Completed rounds over all of memory.
    pub rounds: u64,
    /// Of the zero pages (`duplicate`), those known to be zero without
    /// being read: never written (the bulk stage skips reading them).
    #[serde(default)]
    pub untouched: u64,
    /// Page requests the destination sent during postcopy.
    #[serde(default)]
    pub postcopy_requests: u64,
    /// Bytes sent after the switch to postcopy.
    #[serde(default)]
    pub postcopy_bytes: u64,
}

/// XBZRLE figures.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct XbzrleStats {
    /// Cache size in bytes.
    pub cache_size: u64,
    /// Encoded bytes sent.
    pub bytes: u64,
    /// Pages sent as deltas.
    pub pages: u64,
    /// Lookups that found no cached copy.
    pub cache_miss: u64,
    /// Misses over lookups in the last period.
    pub cache_miss_rate: f64,
    /// Page bytes over encoded bytes in the last period.
    pub encoding_rate: f64,
    /// Pages whose delta did not fit and went raw.
    pub overflow: u64,
    /// Re-sent pages that did not try a delta because, over the last
    /// window, deltas cost more link time than they saved (adaptive
    /// encoding).
    #[serde(default)]
    pub skipped_pages: u64,
}

/// Compression figures.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct CompressionStats {
    /// Pages sent compressed.
    pub pages: u64,
    /// Compressed bytes sent.
    pub compressed_size: u64,
    /// Page bytes over compressed bytes.
    pub compression_rate: f64,
    /// Pages sent uncompressed because compressing them cost more time
    /// than the bytes it saved take on the link (adaptive encoding).
    #[serde(default)]
    pub skipped_pages: u64,
}

/// Where the pause went, on the source's clock, in microseconds. The parts
/// follow each other and add up to the source's view of the pause
/// ([`MigrationStats::source_downtime`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct PauseBreakdown {
    /// Stopping the guest ([`crate::vm::VmControl::pause`]: every vCPU
    /// out of the guest).
    pub stop_us: u64,
    /// The final dirty sync (with the page channels' barrier).
    pub sync_us: u64,
    /// Sending what was left: the remaining pages (precopy), or the
    /// not-valid bitmap (a postcopy switch).
    pub pages_us: u64,
    /// Saving the device state and sending it.
    pub state_us: u64,
    /// The source's verify digest (0 without verify, or at a postcopy
    /// switch).
    pub digest_us: u64,
    /// From the stream's end record (or the switch record) to STARTED:
    /// writing the end, the destination's last reads, checks and restore,
    /// LOADED, GO, its resume and STARTED. Without a return path, writing
    /// the end only.
    pub handshake_us: u64,
    /// Not part of the pause: how long the source waited, just before it,
    /// with the guest still running, for the destination to apply every
    /// byte sent (the drain mark, see `stream/format.rs`; 0 without a
    /// return path).
    #[serde(default)]
    pub drain_us: u64,
    /// Stream bytes (all channels) written before the pause that the
    /// destination had not confirmed applying when the guest paused: what
    /// the pause still had to wait for on top of its own bytes (after the
    /// drain, only the barrier records that followed it; 0 without a
    /// return path: a file has no reader to wait for).
    #[serde(default)]
    pub in_flight_bytes: u64,
    /// Not part of the pause: the last empty round trip to the destination
    /// before it (a drain mark with nothing before it, the guest running),
    /// which prices the handshake on a loaded host (see `pacing.rs`; 0
    /// without a return path or before any switch-over decision).
    #[serde(default)]
    pub ping_us: u64,
    /// The handshake the pause's estimate counted, µs (compare
    /// [`Self::handshake_us`]).
    #[serde(default)]
    pub handshake_estimate_us: u64,
    /// Of [`Self::handshake_us`]: from writing the stream's end to reading
    /// LOADED (the destination's last reads, its digest check and state
    /// restore, and a round trip). The rest is GO to STARTED.
    #[serde(default)]
    pub loaded_us: u64,
    /// The destination's own time from GO's arrival to its guest's
    /// resume, as it reported in STARTED (0 when it did not).
    #[serde(default)]
    pub dest_resume_us: u64,
}

impl PauseBreakdown {
    /// The whole pause the parts cover.
    pub fn total_us(&self) -> u64 {
        self.stop_us
            + self.sync_us
            + self.pages_us
            + self.state_us
            + self.digest_us
            + self.handshake_us
    }
}

/// The state of one migration, as `query-migrate` reports it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationStats {
    /// Where the migration is.
    pub status: Status,
    /// Milliseconds since the start (final: the whole migration).
    pub total_time: u64,
    /// Milliseconds of setup.
    pub setup_time: u64,
    /// Milliseconds the guest was paused (once completed), where the guest
    /// sees it: from the source's pause to the destination's resume (the
    /// destination reports its resume time in STARTED, see `ack.rs`). Without
    /// a return path (a snapshot file), the source's pause to its end.
    pub downtime: u64,
    /// Milliseconds from the source's pause until it heard STARTED: the
    /// source's view, a little longer than [`MigrationStats::downtime`]
    /// (the half round trip back).
    #[serde(default)]
    pub source_downtime: u64,
    /// The downtime limit (ms) in force at the switch-over (before it:
    /// the current one).
    #[serde(default)]
    pub downtime_limit: u64,
    /// The migration completed, but its downtime overshot its limit.
    #[serde(default)]
    pub downtime_limit_exceeded: bool,
    /// Where the pause went, part by part (once paused for good).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_breakdown: Option<PauseBreakdown>,
    /// Predicted pause if the guest were paused now, in milliseconds:
    /// remaining pages at a conservative bandwidth, the final sync, device
    /// state, the verify digest and the handshake.
    pub expected_downtime: u64,
    /// Milliseconds the source spent hashing memory for verify mode, part
    /// of the downtime (0 without verify).
    pub verify_time: u64,
    /// RAM figures.
    pub ram: RamStats,
    /// XBZRLE figures, when XBZRLE is on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub xbzrle_cache: Option<XbzrleStats>,
    /// Compression figures, when compression is on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compression: Option<CompressionStats>,
    /// Current guest throttle.
    pub cpu_throttle_percentage: u8,
    /// The dirty tracker in use.
    pub dirty_tracker: String,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_desc: Option<String>,
    /// Postcopy: total milliseconds guest threads waited for pages from
    /// the source (the sum over threads), as the destination measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy_blocktime: Option<u64>,
    /// Postcopy: milliseconds each faulting thread (vCPU) waited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy_vcpu_blocktime: Option<Vec<u64>>,
    /// Postcopy: mean µs from a remote fault to the page's placement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy_latency: Option<u64>,
    /// Postcopy: remote faults per power-of-two µs bucket (bucket i:
    /// `[2^i, 2^(i+1))` µs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy_latency_dist: Option<Vec<u64>>,
    /// Postcopy: median and 99th percentile fault latency, µs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy_latency_p50: Option<u64>,
    /// See `postcopy_latency_p50`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy_latency_p99: Option<u64>,
    /// Milliseconds from the switch to postcopy to the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy_time: Option<u64>,
    /// Postcopy: local faults, as the destination counted them: a guest
    /// thread touched a page valid there but never written, and the
    /// destination filled it (and up to 2 MiB of valid pages after it)
    /// with zeros itself, asking the source for nothing. Not part of the
    /// remote-fault figures above.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy_local_faults: Option<u64>,
    /// Postcopy: pages those local faults filled with zeros.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy_local_pages: Option<u64>,
    /// Postcopy: mean µs from reading a local fault to waking its thread.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy_local_latency: Option<u64>,
    /// Precopy after its first pass: whether it is converging, from the
    /// guest's dirty rate against the rate sent (None until measured, and
    /// once paused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub convergence: Option<Convergence>,
    /// Pauses the source cut short: the rest of a stop-and-copy would have
    /// crossed the downtime limit (the rate fell in the pause, or its
    /// first parts took longer than estimated), so the source resumed its
    /// guest and went on with precopy (see `pacing.rs`).
    #[serde(default)]
    pub pause_backouts: u32,
    /// The longest of those cut-short pauses, ms (the guest saw them too;
    /// 0 without one).
    #[serde(default)]
    pub backout_pause_max: u64,
}

/// Whether precopy is converging (see `engine/converge.rs`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Convergence {
    /// False when precopy cannot reach the downtime limit as things are:
    /// the guest dirties memory at least as fast as it is sent, or several
    /// syncs in a row left no fewer pages.
    pub converging: bool,
    /// Bytes per second the guest dirtied over the last measuring period.
    pub dirty_rate: u64,
    /// Bytes per second sent over the same period.
    pub send_rate: u64,
    /// Consecutive syncs that did not shrink the pages left by a tenth.
    pub stalled_syncs: u32,
    /// Milliseconds until the pages left fit the downtime limit at these
    /// rates (None: never, the guest dirties at least as fast).
    pub projected_ms: Option<u64>,
}
