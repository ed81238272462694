//! Thin wrappers around system calls: every `unsafe` block of the library
//! lives below this module, each with a `// SAFETY:` note.

pub mod mmap;
pub mod shm;
pub mod uffd;
