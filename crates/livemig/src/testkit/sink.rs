//! A destination that accepts a migration and throws it away: it answers
//! what the source waits for before its first page (ACCEPTED, after the
//! setup section) and before each pause (APPLIED, for each DRAIN mark),
//! but never LOADED, so the source keeps migrating until it is cancelled
//! or the connection ends. For tests of the source's control paths (cancel,
//! status, progress) that need a live peer but no guest.

use std::io::{Read, Write};

use crate::engine::{write_reply, Reply};
use crate::stream::{Record, StreamReader};

/// Reads the stream from `reader`, answering on `ack` (if any) as
/// described in the module doc, until the stream ends, fails or the source
/// goes away; then keeps reading raw bytes until the connection closes.
/// Returns the bytes read.
pub fn swallow<R: Read>(mut reader: R, mut ack: Option<&mut dyn Write>) -> u64 {
    let Ok(mut r) = StreamReader::new(&mut reader) else {
        return 0;
    };
    let mut drain = None;
    loop {
        let answer = match r.next_record() {
            Ok(Record::SectionEnd { seq: 0 }) => Some(Reply::Accepted),
            Ok(Record::Drain { mark }) => {
                drain = Some(mark);
                None
            }
            Ok(Record::SectionEnd { .. }) => drain.take().map(Reply::Applied),
            Ok(Record::End) | Err(_) => break,
            Ok(_) => None,
        };
        if let (Some(a), Some(w)) = (answer, ack.as_mut()) {
            let _ = write_reply(&mut **w, &a);
        }
    }
    // The end, or a stream cut short: hold the connection until the source
    // leaves (it waits for LOADED, which never comes).
    let mut n = r.offset();
    drop(r);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match reader.read(&mut buf) {
            Ok(0) | Err(_) => return n,
            Ok(k) => n += k as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::format::FLAG_SETUP;
    use crate::stream::StreamWriter;

    #[test]
    fn answers_the_setup_and_each_drain_mark_and_reads_to_the_end() {
        let mut w = StreamWriter::new(Vec::new(), FLAG_SETUP);
        let ram = crate::stream::BlockDesc {
            id: "ram".into(),
            len: 1 << 20,
        };
        w.block_list(&[ram]).unwrap();
        w.setup(1, 0).unwrap();
        w.section_end(0).unwrap();
        w.drain(1).unwrap();
        w.section_end(1).unwrap();
        w.section_end(2).unwrap();
        w.end().unwrap();
        let bytes = std::mem::take(w.get_mut());
        let mut replies = Vec::new();
        let n = swallow(&bytes[..], Some(&mut replies));
        assert_eq!(n, bytes.len() as u64);
        let mut back = &replies[..];
        let first = crate::engine::read_reply(&mut back).unwrap();
        assert!(matches!(first, Reply::Accepted), "{first:?}");
        let second = crate::engine::read_reply(&mut back).unwrap();
        assert!(matches!(second, Reply::Applied(1)), "{second:?}");
        assert!(back.is_empty(), "one answer per mark, none for section 2");
    }
}
