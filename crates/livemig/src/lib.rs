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
#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod bitmap;
pub mod compress;
pub mod dirty;
pub mod engine;
pub mod memory;
pub mod page_cache;
pub mod stream;
pub mod sys;
pub mod transport;
pub mod vm;
pub mod workload;
pub mod xbzrle;
pub mod zero;

pub use bitmap::DirtyBitmap;
pub use memory::{GuestMemory, ProcessMemory, RamBlock, PAGE_SIZE};
