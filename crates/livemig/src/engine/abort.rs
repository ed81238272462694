//! The source's ABORT record: a source that gives up tells the
//! destination why, so the destination reports `source aborted: <reason>`
//! instead of a stream that stopped short.
//!
//! The main stream's transport is shared between the stream writer and
//! an [`AbortHandle`] that outlives the writer. The writer hands the
//! transport whole buffers of complete records (`write_all`), so as long
//! as no write failed, what the transport took ends at a record boundary
//! and an ABORT record may follow it.

use std::cell::RefCell;
use std::io::{self, Write};
use std::rc::Rc;

use super::MigrationError;
use crate::stream::StreamWriter;

struct Shared<W> {
    out: W,
    /// Bytes handed to the transport.
    written: u64,
    /// A write failed: the transport is broken or the stream is cut inside
    /// a record.
    failed: bool,
}

/// The transport as the stream writer uses it.
pub(crate) struct Tap<W>(Rc<RefCell<Shared<W>>>);

/// Sends the ABORT record after the writer is gone.
pub(crate) struct AbortHandle<W>(Rc<RefCell<Shared<W>>>);

/// Shares `out` between the stream writer and an abort handle.
pub(crate) fn tap<W: Write>(out: W) -> (Tap<W>, AbortHandle<W>) {
    let s = Rc::new(RefCell::new(Shared {
        out,
        written: 0,
        failed: false,
    }));
    (Tap(s.clone()), AbortHandle(s))
}

impl<W: Write> Write for Tap<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut s = self.0.borrow_mut();
        match s.out.write(buf) {
            Ok(n) => {
                s.written += n as u64;
                Ok(n)
            }
            Err(e) => {
                if e.kind() != io::ErrorKind::Interrupted {
                    s.failed = true;
                }
                Err(e)
            }
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        let mut s = self.0.borrow_mut();
        let r = s.out.flush();
        if r.is_err() {
            s.failed = true;
        }
        r
    }
}

/// Whether the destination should hear of `e` from the source: when the
/// source itself gave up (cancelled, its parameters, tracker or VMM
/// failed). Not when the destination refused or failed, not when a
/// connection broke (the destination sees that break itself), not once
/// the stream ended (the handshake carries what follows), not after the
/// switch to postcopy.
fn worth_telling(e: &MigrationError) -> bool {
    matches!(
        e,
        MigrationError::Cancelled
            | MigrationError::Params(_)
            | MigrationError::Tracker(_)
            | MigrationError::Vm(_)
    )
}

impl<W: Write> AbortHandle<W> {
    /// Ends the stream with ABORT and the reason for `e`, when the
    /// destination should hear it and the transport can still carry it.
    /// Best effort: a failure here changes nothing for the source.
    pub(crate) fn tell(self, e: &MigrationError) {
        if !worth_telling(e) {
            return;
        }
        let Ok(shared) = Rc::try_unwrap(self.0) else {
            // The writer still holds the transport: nothing to do safely.
            return;
        };
        let s = shared.into_inner();
        if s.failed {
            return;
        }
        // Nothing went out yet: a header first, so the destination reads
        // a stream that says why it ends.
        let reason = crate::error_chain(e);
        let mut w = if s.written == 0 {
            StreamWriter::new(s.out, 0)
        } else {
            StreamWriter::continuing(s.out)
        };
        if let Err(err) = w.abort(&reason) {
            log::debug!("the abort record did not reach the destination: {err}");
        }
    }
}
