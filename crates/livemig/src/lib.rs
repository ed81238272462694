//! livemig: precopy live migration of virtual machine memory.
//!
//! The data path, one module per step:
//! guest [`memory`] → [`dirty`] tracker → page search in the [`engine`] →
//! page [`codec`]s ([`zero`](codec::zero), [`xbzrle`](codec::xbzrle) with its
//! [`page_cache`](codec::page_cache), [`compress`](codec::compress)) →
//! [`stream`] → [`transport`] → the destination loader in [`engine`] →
//! guest memory.
//!
//! All `unsafe` code (mmap, ioctls, userfaultfd) lives in the private `sys`
//! module, plus the SIMD loads of the zero-page check in [`codec::zero`],
//! of the XBZRLE encoder in `codec::diff` and of the one-pass page copy
//! and checksum in [`stream::crc`];
//! the crate denies `unsafe_code` everywhere else and clippy's
//! `undocumented_unsafe_blocks` everywhere, so everything above is safe
//! Rust and testable without KVM.
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
//! // Destination (another process): memory laid out by its own configuration.
//! let memory = ProcessMemory::single(1 << 30)?;
//! // One call: accept, load over every channel, restore the state, the
//! // completion handshake (LOADED, the source's GO, resume, STARTED).
//! let listener = Listener::bind(&"tcp:127.0.0.1:4444".parse()?)?;
//! let arrived = Destination::new(&memory, &mut livemig::vm::NoVm).accept_on(&listener)?;
//! println!("{} raw pages", arrived.load.stats.raw_pages);
//! # Ok(())
//! # }
//! ```
//!
//! # Integrating a KVM VMM
//!
//! `examples/kvm_vmm.rs` is a complete, runnable VMM (vm-memory +
//! kvm-ioctls, about 400 lines) that migrates itself to another process;
//! `tests/kvm_example.rs` runs it. The steps:
//!
//! 1. **Memory.** Wrap the VMM's `Arc<GuestMemoryMmap<B>>` in
//!    [`memory::VmMemory`] (one RAM block per region, feature `vm-memory`,
//!    on by default), or implement [`GuestMemory`] for your own mapping.
//!    Use `GuestMemoryMmap<AtomicBitmap>` if devices write through it.
//! 2. **Tracker** (feature `kvm`). Before creating vCPUs, build a
//!    [`dirty::kvm::KvmDirtyLog`] from your `Arc<VmFd>` and one
//!    [`dirty::kvm::KvmSlot`] per region (slot id, guest address, the
//!    block): it registers the slots with KVM and, if asked, enables the
//!    dirty ring. After creating the vCPUs, `attach_vcpus`. Then
//!    `log.tracker(log.resolve(TrackerKind::Auto).0)` gives manual protect
//!    (initially set) where offered, else the classic bitmap. With the
//!    ring, the vCPU loop answers exit [`dirty::kvm::EXIT_DIRTY_RING_FULL`]
//!    with `log.ring_full(i, &vcpu)` and `log.wait_harvested(..)`.
//! 3. **Device writes.** KVM logs only the guest's own writes. Wrap the
//!    tracker in [`dirty::WithDeviceWrites`] with a [`dirty::DeviceWrites`]:
//!    `DeviceWrites::from_vm_memory(mem)` reads vm-memory's dirty bitmap,
//!    and any device thread holding a clone can call
//!    `mark_dirty(guest_addr, len)` after it writes guest memory.
//! 4. **vCPU control.** Implement [`vm::VmControl`]: `pause` returns only
//!    once no vCPU runs and no device writes guest memory any more,
//!    `resume` undoes it, `set_throttle` (optional) slows vCPUs for
//!    auto-converge, `save_state` returns the vCPU and device state as
//!    bytes, which travel at the end of the stream.
//! 5. **Source.** [`engine::Source::new`]`(&memory, &mut tracker, &mut
//!    control, handle).run_over(transport::connect(&uri)?)` (or
//!    `run_with_channels` for several page channels). On success the
//!    source stays paused; on failure or cancel it runs on.
//! 6. **Destination.** Lay memory out the same way, implement
//!    [`vm::VmControl::restore_state`] too, and call
//!    [`engine::Destination`]`::new(&memory, &mut control).accept_on(&listener)`:
//!    it loads (page channels included), restores the state, answers
//!    LOADED, resumes the vCPUs only on the source's GO and says STARTED;
//!    `.postcopy(true)` lets the source switch to postcopy. Any failure
//!    before GO reaches the source, which keeps its guest.
#![warn(missing_docs)]

pub mod bitmap;
pub mod codec;
pub mod control;
pub mod dirty;
pub mod engine;
pub mod memory;
pub mod snapshot;
pub mod stream;
#[allow(unsafe_code)]
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
