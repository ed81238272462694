//! The migration stream: livemig's own versioned wire format.
//!
//! [`format`](mod@format) defines it, [`StreamWriter`] produces it and
//! [`StreamReader`] validates it record by record.

pub mod crc;
pub mod format;
mod reader;
mod writer;

pub use reader::{OwnedRecord, Record, RecordOf, StreamError, StreamErrorKind, StreamReader};
pub use writer::{BlockDesc, Encoded, StreamWriter};
#[cfg(test)]
mod tests;
