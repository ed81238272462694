//! Migration parameters and capabilities, changeable while migrating.

use serde::{Deserialize, Serialize};

/// Compression of raw pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompressParams {
    /// Algorithm.
    pub algorithm: crate::codec::compress::Algorithm,
    /// Level (zstd: 1..=19; ignored by lz4).
    pub level: i32,
}

/// When a migration with `postcopy-ram` switches to postcopy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Switchover {
    /// Only on `migrate-start-postcopy` (QEMU's behaviour).
    #[default]
    Manual,
    /// Also by itself: when a sync after the bulk stage finds the remaining
    /// set no smaller than what the previous one left (precopy does not
    /// converge); when two syncs in a row predict that precopy would re-send
    /// at least an eighth of guest memory before it could finish (syncs
    /// every 20 ms in the first pass measure it early; see
    /// `engine/postcopy/switchover.rs`); and at stop-and-copy whenever what
    /// is left would not fit the downtime limit.
    Auto,
}

/// How a migration moves guest memory (parameter `mode`, after QEMU's
/// parameter of that name, whose `cpr-transfer` is the closest kin of
/// `local`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationMode {
    /// Pages are copied through the stream (precopy, postcopy).
    #[default]
    Normal,
    /// Zero-copy to a process on the same host over a `unix:` socket:
    /// memfd-backed memory is handed over, nothing is copied or tracked
    /// (see [`super::local`]). Both sides must use it; page-moving
    /// settings (channels, compression, XBZRLE, postcopy) do not apply.
    Local,
}

/// Parameters of one migration. All fields may change while it runs
/// (through [`super::MigrationHandle::set_params`]); the engine reads them
/// at every iteration step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct Params {
    /// Bandwidth cap in bytes per second; 0 = unlimited.
    pub max_bandwidth: u64,
    /// Longest pause the guest may see at switch-over, in milliseconds.
    pub downtime_limit: u64,
    /// XBZRLE delta encoding of re-sent pages.
    pub xbzrle: bool,
    /// XBZRLE page cache size in bytes.
    pub xbzrle_cache_size: u64,
    /// Compression of raw pages (None = off).
    pub compress: Option<CompressParams>,
    /// Send a digest of all guest memory at stop time (lengthens downtime).
    pub verify: bool,
    /// Throttle the guest when it dirties memory faster than we send it.
    pub auto_converge: bool,
    /// First throttle percentage.
    pub cpu_throttle_initial: u8,
    /// Throttle increment each further time.
    pub cpu_throttle_increment: u8,
    /// Throttle ceiling.
    pub max_cpu_throttle: u8,
    /// Sync period while throttling, in milliseconds (keeps the dirty-rate
    /// measurement fresh during long rounds).
    pub throttle_sync_period: u64,
    /// Dirty-limit: the most bytes per second each vCPU may dirty while the
    /// migration runs (0 = off). A VMM setting rather than an engine one:
    /// the VMM applies it to its vCPUs (minivm: `dirtylimit::follow`, only
    /// with the KVM dirty ring, which counts pages per vCPU). vCPUs that
    /// dirty less run untouched, unlike auto-converge's throttle.
    pub dirty_limit: u64,
    /// Page channels (like QEMU's multifd-channels). 1 = one stream, pages
    /// sent by the migration thread. N > 1 = N more connections, each with
    /// its own thread that detects zero pages, compresses and sends batches
    /// of pages, beside the main connection (block list, sync barriers,
    /// XBZRLE pages, device state). Read once, when the migration starts.
    pub channels: u16,
    /// Adaptive encoding: compress a page only while compressing pays on
    /// the link (the compressor's time per page against the link time
    /// the smaller page saves), and try XBZRLE only while its deltas save
    /// more link time than they cost. Off: every page is compressed when
    /// compression is on, and every re-sent page tries XBZRLE.
    pub adaptive_encoding: bool,
    /// Capability `postcopy-ram`: the migration may switch to postcopy (the
    /// guest moves before all of its memory; the destination fetches the
    /// rest on demand). Needs the destination's consent too and a return
    /// path the engine owns ([`super::Source::run_conn`]).
    pub postcopy_ram: bool,
    /// When to switch to postcopy (with `postcopy_ram`).
    pub postcopy_switchover: Switchover,
    /// Capability `postcopy-preempt`: after the switch, requested pages go
    /// on a connection of their own, so they never queue behind bulk pages
    /// (the source opens it like a page channel; the destination accepts
    /// it on the same listener).
    pub postcopy_preempt: bool,
    /// How memory moves: copied (`normal`) or handed over (`local`). Read
    /// once, when the migration starts.
    pub mode: MigrationMode,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            max_bandwidth: 0,
            downtime_limit: 300,
            xbzrle: false,
            xbzrle_cache_size: 64 << 20,
            compress: None,
            verify: false,
            auto_converge: false,
            cpu_throttle_initial: 20,
            cpu_throttle_increment: 10,
            max_cpu_throttle: 99,
            throttle_sync_period: 5000,
            dirty_limit: 0,
            channels: 1,
            adaptive_encoding: true,
            postcopy_ram: false,
            postcopy_switchover: Switchover::Manual,
            postcopy_preempt: false,
            mode: MigrationMode::Normal,
        }
    }
}

/// A migration parameter that cannot be used: each variant names the
/// parameter (QEMU's spelling) and its allowed range.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParamsError {
    /// `downtime-limit` outside 1..=2000000 ms.
    #[error("downtime-limit {0} ms outside 1..=2000000")]
    DowntimeLimit(u64),
    /// `xbzrle-cache-size` smaller than a page while XBZRLE is on.
    #[error("xbzrle-cache-size {0} is smaller than a page")]
    XbzrleCacheSize(u64),
    /// A throttle percentage outside 1..=99.
    #[error("{name} {value} outside 1..=99")]
    Throttle {
        /// The parameter.
        name: &'static str,
        /// Its value.
        value: u8,
    },
    /// `dirty-limit` below one page per second (and not 0 = off).
    #[error("dirty-limit {0} B/s is below one page per second (0 = off)")]
    DirtyLimit(u64),
    /// `channels` outside 1..=max.
    #[error("channels {value} outside 1..={max}")]
    Channels {
        /// Its value.
        value: u16,
        /// The most the stream format carries.
        max: u16,
    },
    /// A zstd level outside 1..=19.
    #[error("zstd level {0} outside 1..=19")]
    ZstdLevel(i32),
    /// `postcopy-ram` on a source whose return path the engine does not own.
    #[error(
        "postcopy-ram needs a return path the engine owns (Source::run_conn, run_over or run_to)"
    )]
    PostcopyNeedsReturnPath,
    /// A postcopy recovery connection without a return path.
    #[error("postcopy recovery needs a connection with a return path")]
    RecoveryNeedsReturnPath,
}

impl Params {
    /// Checks ranges; the error names the bad parameter.
    pub fn validate(&self) -> Result<(), ParamsError> {
        if self.downtime_limit == 0 || self.downtime_limit > 2_000_000 {
            return Err(ParamsError::DowntimeLimit(self.downtime_limit));
        }
        if self.xbzrle && self.xbzrle_cache_size < crate::PAGE_SIZE as u64 {
            return Err(ParamsError::XbzrleCacheSize(self.xbzrle_cache_size));
        }
        for (name, value) in [
            ("cpu-throttle-initial", self.cpu_throttle_initial),
            ("cpu-throttle-increment", self.cpu_throttle_increment),
            ("max-cpu-throttle", self.max_cpu_throttle),
        ] {
            if value == 0 || value > 99 {
                return Err(ParamsError::Throttle { name, value });
            }
        }
        if self.dirty_limit != 0 && self.dirty_limit < crate::PAGE_SIZE as u64 {
            return Err(ParamsError::DirtyLimit(self.dirty_limit));
        }
        let max = crate::stream::format::MAX_CHANNELS;
        if self.channels == 0 || self.channels > max {
            return Err(ParamsError::Channels {
                value: self.channels,
                max,
            });
        }
        if let Some(c) = self.compress {
            if c.algorithm == crate::codec::compress::Algorithm::Zstd
                && !(1..=19).contains(&c.level)
            {
                return Err(ParamsError::ZstdLevel(c.level));
            }
        }
        Ok(())
    }
}
