//! The destination's acknowledgement on a two-way transport: the source
//! only declares success once the destination has loaded and checked all.
//!
//! ```text
//! ack := "LVMGACK1" status:u8 (0 = loaded, 1 = failed) len:u32 message:[u8; len]
//! ```

use std::io::{self, Read, Write};

use super::MigrationError;
use crate::stream::format::{ACK_MAGIC, MAX_ACK_MESSAGE};

/// Sends an acknowledgement: `Ok(())` or the destination's error message.
pub fn write_ack(w: &mut dyn Write, result: Result<(), &str>) -> io::Result<()> {
    let (status, msg) = match result {
        Ok(()) => (0u8, ""),
        Err(m) => (1u8, m),
    };
    let msg = &msg.as_bytes()[..msg.len().min(MAX_ACK_MESSAGE as usize)];
    let mut buf = Vec::with_capacity(13 + msg.len());
    buf.extend_from_slice(&ACK_MAGIC);
    buf.push(status);
    buf.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    buf.extend_from_slice(msg);
    w.write_all(&buf)?;
    w.flush()
}

/// Waits for the destination's acknowledgement.
pub fn read_ack(r: &mut dyn Read) -> Result<(), MigrationError> {
    let mut head = [0u8; 13];
    r.read_exact(&mut head).map_err(|e| {
        MigrationError::Ack(format!("no acknowledgement from the destination: {e}"))
    })?;
    if head[..8] != ACK_MAGIC {
        return Err(MigrationError::Ack(format!(
            "bad acknowledgement magic {:02x?}",
            &head[..8]
        )));
    }
    let len = u32::from_be_bytes([head[9], head[10], head[11], head[12]]);
    if len > MAX_ACK_MESSAGE {
        return Err(MigrationError::Ack(format!(
            "acknowledgement message of {len} bytes exceeds {MAX_ACK_MESSAGE}"
        )));
    }
    let mut msg = vec![0u8; len as usize];
    r.read_exact(&mut msg)
        .map_err(|e| MigrationError::Ack(format!("truncated acknowledgement: {e}")))?;
    match head[8] {
        0 => Ok(()),
        1 => Err(MigrationError::Destination(
            String::from_utf8_lossy(&msg).into_owned(),
        )),
        s => Err(MigrationError::Ack(format!(
            "unknown acknowledgement status {s}"
        ))),
    }
}
