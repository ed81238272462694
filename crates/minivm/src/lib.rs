//! minivm: a reference KVM VMM for livemig.
//!
//! - [`Vm`]: guest memory in one or more KVM slots (exposed to livemig as
//!   [`livemig::memory::VmMemory`]), 1..N vCPU threads, pause/resume,
//!   throttle, memory dump;
//! - [`guest`]: the built-in ring-3 test guest (self-checking page writer)
//!   and foreign images (boot sector, flat binary);
//! - [`dirty`]: KVM dirty trackers (bitmap, manual protect, ring) behind
//!   livemig's `DirtyTracker`;
//! - [`state`]: vCPU and device state as a versioned blob;
//! - [`sys`]: the raw ioctls and mappings kvm-ioctls lacks (all `unsafe`
//!   outside kvm-ioctls calls).
//!
//! Source side of a migration: `Vm::new`, `vm.memory()`, `vm.tracker(kind)`,
//! `vm.control()` (livemig `VmControl`). Destination: `Vm::new` with
//! `GuestImage::Incoming` and `start_paused`, load RAM into `vm.memory()`,
//! `vm.restore_state(blob)`, `vm.resume()`.
#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod bench;
pub mod control;
pub mod devices;
pub mod dirty;
pub mod dirtylimit;
pub mod guest;
pub mod migrate;
pub mod state;
pub mod sys;
pub mod vm;

pub use devices::SerialOut;
pub use dirty::TrackerKind;
pub use guest::{CpuMode, GuestImage, TestGuestConfig};
pub use vm::{GuestStatus, SlotInfo, VcpuStatus, Vm, VmConfig, VmError, VmHandle};
