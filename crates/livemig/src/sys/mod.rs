//! Thin wrappers around system calls: every `unsafe` block of the library
//! lives below this module, each with a `// SAFETY:` note.

#[cfg(feature = "kvm")]
pub mod kvm;
pub mod memfd;
pub mod mmap;
pub mod residency;
pub mod sched;
pub mod scm;
pub mod shm;
pub mod uffd;
