//! Resource limits at the destination: whatever a stream claims, the
//! loader writes only into the memory its own configuration laid out,
//! sizes no buffer from an unchecked length, and an endless stream of
//! barriers cannot make it run ahead of the other channels.

use std::io::{self, Read};

use livemig::engine::{LoadError, Loader};
use livemig::memory::{GuestMemory, ProcessMemory};
use livemig::stream::format::{Kind, FLAG_CHANNELS, MAX_STATE};
use livemig::stream::{BlockDesc, StreamWriter};

const MIB: u64 = 1 << 20;

type Conn<'a> = Box<dyn Read + Send + 'a>;

fn stream_with(blocks: &[BlockDesc], flags: u16, body: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut buf = Vec::new();
    {
        let mut w = StreamWriter::new(&mut buf, flags);
        w.block_list(blocks).unwrap();
        w.section_end(0).unwrap();
        w.flush().unwrap();
    }
    body(&mut buf);
    buf
}

fn ram(len: u64) -> Vec<BlockDesc> {
    vec![BlockDesc {
        id: "ram0".into(),
        len,
    }]
}

/// Destination memory with a marker that a refused stream must leave alone.
fn marked() -> ProcessMemory {
    let m = ProcessMemory::new(&[("ram0", MIB)]).unwrap();
    m.blocks()[0].region().write(0, b"marker");
    m
}

fn marker_intact(m: &ProcessMemory) -> bool {
    let mut b = [0u8; 6];
    m.blocks()[0].region().read(0, &mut b);
    &b == b"marker"
}

#[test]
fn a_block_of_one_tebibyte_is_refused_before_any_write() {
    let dst = marked();
    let mut bytes = Vec::new();
    {
        let mut w = StreamWriter::new(&mut bytes, 0);
        w.block_list(&ram(1 << 40)).unwrap();
        w.section_end(0).unwrap();
        // A page far outside the destination's 1 MiB, inside the claim.
        w.raw(0, 512 << 30, &[0x55; 4096]).unwrap();
        w.section_end(1).unwrap();
        w.end().unwrap();
    }
    let e = Loader::new(&dst).load(&bytes[..]).unwrap_err();
    assert!(matches!(e, LoadError::Layout { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("block 'ram0' is 1099511627776 bytes in the stream, 1048576 here"),
        "{e}"
    );
    assert!(marker_intact(&dst));
    // More blocks than the destination has, or one it does not have.
    for blocks in [
        vec![
            BlockDesc {
                id: "ram0".into(),
                len: MIB,
            },
            BlockDesc {
                id: "extra".into(),
                len: 1 << 40,
            },
        ],
        vec![BlockDesc {
            id: "other".into(),
            len: MIB,
        }],
    ] {
        let s = stream_with(&blocks, 0, |_| {});
        let e = Loader::new(&dst).load(&s[..]).unwrap_err();
        assert!(matches!(e, LoadError::Layout { .. }), "{e}");
    }
    assert!(marker_intact(&dst));
}

#[test]
fn huge_lengths_are_refused_before_they_are_used() {
    let dst = marked();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "device state length 4294967295 outside 0..=67108864",
            stream_with(&ram(MIB), 0, |b| {
                b.push(Kind::State as u8);
                b.extend_from_slice(&u32::MAX.to_be_bytes());
            }),
        ),
        (
            "device state length 67108865",
            stream_with(&ram(MIB), 0, |b| {
                b.push(Kind::State as u8);
                b.extend_from_slice(&(MAX_STATE + 1).to_be_bytes());
            }),
        ),
        (
            "xbzrle payload length 65535 outside 1..=4096",
            stream_with(&ram(MIB), 0, |b| {
                b.push(Kind::Xbzrle as u8);
                b.extend_from_slice(&0u16.to_be_bytes());
                b.extend_from_slice(&0u64.to_be_bytes());
                b.extend_from_slice(&u16::MAX.to_be_bytes());
            }),
        ),
        ("block list declares 4294967295 blocks", {
            let mut b = stream_with(&ram(MIB), 0, |_| {});
            b.truncate(16);
            b.push(Kind::BlockList as u8);
            b.extend_from_slice(&u32::MAX.to_be_bytes());
            b
        }),
    ];
    for (want, bytes) in cases {
        let e = Loader::new(&dst).load(&bytes[..]).unwrap_err();
        assert!(e.to_string().contains(want), "want '{want}', got: {e}");
    }
    // A state blob whose length is in bounds but whose bytes never come:
    // the reader fails at the end of what arrived (it does not reserve
    // 64 MiB up front and wait).
    let s = stream_with(&ram(MIB), 0, |b| {
        b.push(Kind::State as u8);
        b.extend_from_slice(&MAX_STATE.to_be_bytes());
        b.extend_from_slice(&[7; 100]);
    });
    let e = Loader::new(&dst).load(&s[..]).unwrap_err();
    assert!(e.to_string().contains("stream ends inside"), "{e}");
    assert!(marker_intact(&dst));
}

/// A stream prefix followed by SYNC records with rising epochs, forever.
struct EndlessSyncs {
    prefix: Vec<u8>,
    pos: usize,
    epoch: u64,
    /// Bytes handed out, to show the loader stopped reading early.
    served: u64,
}

impl EndlessSyncs {
    fn new(prefix: Vec<u8>) -> Self {
        EndlessSyncs {
            prefix,
            pos: 0,
            epoch: 0,
            served: 0,
        }
    }
}

impl Read for EndlessSyncs {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut n = 0;
        while n < buf.len() {
            if self.pos == self.prefix.len() {
                self.prefix.clear();
                self.pos = 0;
                self.prefix.push(Kind::Sync as u8);
                self.prefix.extend_from_slice(&self.epoch.to_be_bytes());
                self.epoch += 1;
            }
            let k = (buf.len() - n).min(self.prefix.len() - self.pos);
            buf[n..n + k].copy_from_slice(&self.prefix[self.pos..self.pos + k]);
            self.pos += k;
            n += k;
        }
        self.served += n as u64;
        Ok(n)
    }
}

fn channel_prefix(index: u16, session: u64) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut w = StreamWriter::new(&mut buf, FLAG_CHANNELS);
    w.channel(index, 2, session).unwrap();
    w.block_list(&ram(MIB)).unwrap();
    w.section_end(0).unwrap();
    w.flush().unwrap();
    drop(w);
    buf
}

#[test]
fn endless_sync_records_end_at_the_barrier() {
    const SESSION: u64 = 0x5e55;
    let dst = marked();
    // The main channel sends barriers forever; both page channels end
    // without reaching the first. The main channel must stop at SYNC(0).
    let mut main = EndlessSyncs::new(channel_prefix(0, SESSION));
    let page_channel = |i: u16| {
        let mut b = Vec::new();
        let mut w = StreamWriter::new(&mut b, FLAG_CHANNELS);
        w.channel(i, 2, SESSION).unwrap();
        w.block_list(&ram(MIB)).unwrap();
        w.section_end(0).unwrap();
        w.end().unwrap();
        drop(w);
        b
    };
    let (c1, c2) = (page_channel(1), page_channel(2));
    let mut conns: Vec<Conn<'_>> =
        vec![Box::new(io::Cursor::new(c2)), Box::new(io::Cursor::new(c1))];
    let res = Loader::new(&dst).load_channels(Box::new(&mut main) as Conn<'_>, || {
        conns
            .pop()
            .ok_or_else(|| io::Error::other("no more connections"))
    });
    let e = res.unwrap_err();
    assert!(e.to_string().contains("ended after 0 syncs"), "{e}");
    // It stopped after at most one input buffer, not after gigabytes.
    assert!(main.served <= 1 << 20, "read {} bytes", main.served);
    assert!(marker_intact(&dst));

    // Without channels, a SYNC record is refused at once.
    let mut single = EndlessSyncs::new(stream_with(&ram(MIB), 0, |_| {}));
    let e = Loader::new(&dst).load(&mut single).unwrap_err();
    assert!(
        e.to_string()
            .contains("sync record in a stream whose header does not declare channels"),
        "{e}"
    );
    assert!(single.served <= 1 << 20);
}
