//! livemig: precopy live migration of virtual machine memory.
//!
//! The data path, one module per step:
//! guest [`memory`] → [`dirty`] tracker → page search in the [`engine`] →
//! page codecs ([`zero`], [`xbzrle`] with its [`page_cache`], [`compress`]) →
//! [`stream`] → [`transport`] → the destination loader in [`engine`] →
//! guest memory.
//!
//! All `unsafe` code (mmap, ioctls) lives under [`sys`]; everything above it
//! is safe Rust and testable without KVM.
//!
//! # Example
//!
//! Migrating process memory that a workload writes, tracked with
//! userfaultfd write-protect (a VMM passes its own memory, tracker and
//! vCPU control instead):
//!
//! ```no_run
//! use livemig::dirty::{UffdMode, UffdTracker};
//! use livemig::engine::{Destination, MigrationHandle, Params, Source};
//! use livemig::memory::{GuestMemory, ProcessMemory};
//! use livemig::transport::{connect, Listener};
//! use livemig::vm::NoVm;
//! use livemig::testkit::workload::{direct_writer, Workload, WorkloadConfig};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Source.
//! let memory = ProcessMemory::single(1 << 30)?;
//! let mut tracker = UffdTracker::new(&memory, UffdMode::Auto)?;
//! let guest = Workload::start(
//!     memory.blocks().to_vec(),
//!     direct_writer(memory.blocks().to_vec()),
//!     WorkloadConfig::default(),
//! );
//! let mut vcpus = guest.control();
//! let handle = MigrationHandle::new(Params { xbzrle: true, ..Params::default() });
//! let out = connect(&"tcp:127.0.0.1:4444".parse()?)?;
//! let stats = Source::new(&memory, &mut tracker, &mut vcpus, handle.clone()).run_over(out)?;
//! println!("downtime {} ms", stats.downtime);
//!
//! // Destination (another process): memory laid out by its own
//! // configuration. One call accepts the source (and its page channels),
//! // loads, answers the completion handshake and starts the guest through
//! // the VMM's `VmTarget` only on the source's GO (`NoVm`: memory only).
//! let memory = ProcessMemory::single(1 << 30)?;
//! let listener = Listener::bind(&"tcp:127.0.0.1:4444".parse()?)?;
//! let arrived = Destination::new(&memory, &mut NoVm).accept_on(&listener)?;
//! println!("{} raw pages", arrived.load.stats.raw_pages);
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod bitmap;
pub mod codec;
pub mod control;
pub mod dirty;
pub mod engine;
pub mod memory;
pub mod stream;
mod sys;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod transport;
pub mod vm;

pub use bitmap::DirtyBitmap;
pub use memory::{GuestMemory, ProcessMemory, RamBlock, PAGE_SIZE};

/// An error and its causes on one line, `outer: cause: cause`, leaving out
/// any cause whose text the line already holds (many errors here name
/// their cause in their own message).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = c.source();
    }
    line
}

#[cfg(test)]
mod error_chain_tests {
    #[derive(Debug, thiserror::Error)]
    #[error("open snap: {source}")]
    struct Named {
        source: std::io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("loading failed")]
    struct Outer(#[source] Named);

    #[test]
    fn causes_appear_once() {
        let e = Outer(Named {
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        });
        assert_eq!(
            super::error_chain(&e),
            "loading failed: open snap: no such file"
        );
    }
}
