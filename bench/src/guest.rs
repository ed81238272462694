//! The harness guests (boot sectors built from `bench/guests/*.S` by
//! `bench/guests/build.sh`) and the checks run on a destination's memory.
//!
//! Every check consumes guest memory as a stream of chunks at increasing
//! guest addresses (a memory dump read from a FIFO), so a 4 GiB guest is
//! never held in the harness's memory.

use std::fmt;

/// First guest address the incrementer and the filler write.
pub const FIRST: u64 = 0x10_0000;
/// Guest address of the incrementer's pass counter (u32).
pub const PASSES_ADDR: u64 = 0x7e00;
/// Page size of the guests' layout.
pub const PAGE: u64 = 4096;
/// Sector offset of the parameter block: END u32, SEED u32, N u32, KIND u16.
pub const PARAMS_OFFSET: usize = 0x1f0;

const INCREMENTER: &[u8; 512] = include_bytes!("../guests/incrementer.bin");
const FILLER: &[u8; 512] = include_bytes!("../guests/filler.bin");
const IDLE: &[u8; 512] = include_bytes!("../guests/idle.bin");

/// Which guest a scenario runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GuestKind {
    /// Increments the first byte of every page of [1 MiB, END) forever.
    Incrementer,
    /// Fills [1 MiB, END) once with xorshift32 pages, then halts.
    Filler,
    /// Touches nothing.
    Idle,
}

impl GuestKind {
    /// The serial output that says the guest is ready to be migrated.
    pub fn ready_marker(self) -> &'static str {
        match self {
            GuestKind::Incrementer => "INC\n",
            GuestKind::Filler => "DONE\n",
            GuestKind::Idle => "IDLE\n",
        }
    }

    fn image(self) -> &'static [u8; 512] {
        match self {
            GuestKind::Incrementer => INCREMENTER,
            GuestKind::Filler => FILLER,
            GuestKind::Idle => IDLE,
        }
    }
}

impl fmt::Display for GuestKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GuestKind::Incrementer => "incrementer",
            GuestKind::Filler => "filler",
            GuestKind::Idle => "idle",
        })
    }
}

/// A guest's parameters, patched into its sector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestParams {
    /// End of the written range (exclusive), below 4 GiB.
    pub end: u32,
    /// Filler seed (non-zero).
    pub seed: u32,
    /// Incrementer: a '.' every `n` passes (at least 1).
    pub n: u32,
}

/// The 512-byte boot sector of `kind` with `p` patched in.
pub fn sector(kind: GuestKind, p: GuestParams) -> [u8; 512] {
    let mut s = *kind.image();
    assert_eq!(
        &s[510..],
        &[0x55, 0xaa],
        "{kind} sector has no boot signature"
    );
    let o = PARAMS_OFFSET;
    s[o..o + 4].copy_from_slice(&p.end.to_le_bytes());
    s[o + 4..o + 8].copy_from_slice(&p.seed.max(1).to_le_bytes());
    s[o + 8..o + 12].copy_from_slice(&p.n.max(1).to_le_bytes());
    s
}

/// xorshift32, as the filler computes it.
pub fn xorshift32(mut x: u32) -> u32 {
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    x
}

/// The outcome of a memory check.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CheckResult {
    /// True when the memory is as the guest's invariant says.
    pub ok: bool,
    /// What was checked and, on failure, the first thing that was wrong.
    pub detail: String,
}

/// A check over a stream of guest memory.
pub trait MemCheck: Send {
    /// Feeds `chunk`, the guest's memory at `addr`; calls come at
    /// increasing addresses.
    fn feed(&mut self, addr: u64, chunk: &[u8]);
    /// The verdict once everything was fed.
    fn finish(self: Box<Self>) -> CheckResult;
}

/// The incrementer's invariant over [1 MiB, end): with P the pass counter
/// at 0x7e00, the first byte of every page is P+1 before the writer and P
/// from it on (mod 256). Needs the stream to cover the counter and the
/// whole range.
#[derive(Debug)]
pub struct IncrementerCheck {
    end: u64,
    passes: [Option<u8>; 4],
    /// Page bytes in order: first value, where it stepped down and to what.
    first: Option<u8>,
    step: Option<(u64, u8)>,
    pages_seen: u64,
    error: Option<String>,
}

impl IncrementerCheck {
    /// A check of [1 MiB, `end`).
    pub fn new(end: u64) -> Self {
        IncrementerCheck {
            end,
            passes: [None; 4],
            first: None,
            step: None,
            pages_seen: 0,
            error: None,
        }
    }

    fn page(&mut self, addr: u64, b: u8) {
        self.pages_seen += 1;
        if self.error.is_some() {
            return;
        }
        let Some(first) = self.first else {
            self.first = Some(b);
            return;
        };
        match self.step {
            None if b == first => {}
            None if b == first.wrapping_sub(1) => self.step = Some((addr, b)),
            None => {
                self.error = Some(format!(
                    "page {addr:#x} holds {b}, the pages before it {first}: not one step down"
                ))
            }
            Some((_, v)) if b == v => {}
            Some((at, v)) => {
                self.error = Some(format!(
                    "page {addr:#x} holds {b} after the step to {v} at {at:#x}: a second step \
                     (a stale or lost page)"
                ))
            }
        }
    }
}

impl IncrementerCheck {
    /// Where the writer stood once everything was fed, in passes: the pass
    /// counter plus the fraction of the range written in the current pass
    /// (None when the memory is not as the invariant says).
    pub fn position(&self) -> Option<f64> {
        if self.error.is_some() {
            return None;
        }
        let b = self.passes.iter().copied().collect::<Option<Vec<u8>>>()?;
        let passes = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let p = passes as u8;
        let pages = self.end.saturating_sub(FIRST).div_ceil(PAGE);
        if pages == 0 || self.pages_seen != pages {
            return None;
        }
        let first = self.first?;
        let done = match self.step {
            Some((at, v)) if v == p => (at - FIRST) as f64 / PAGE as f64 / pages as f64,
            None if first == p => 0.0,
            // A pass ended but was not counted yet.
            None if first == p.wrapping_add(1) => 1.0,
            _ => return None,
        };
        Some(passes as f64 + done)
    }
}

impl MemCheck for IncrementerCheck {
    fn feed(&mut self, addr: u64, chunk: &[u8]) {
        let end = addr + chunk.len() as u64;
        for (i, slot) in self.passes.iter_mut().enumerate() {
            let a = PASSES_ADDR + i as u64;
            if (addr..end).contains(&a) {
                *slot = Some(chunk[(a - addr) as usize]);
            }
        }
        let mut p = addr.max(FIRST).next_multiple_of(PAGE);
        while p < end.min(self.end) {
            self.page(p, chunk[(p - addr) as usize]);
            p += PAGE;
        }
    }

    fn finish(self: Box<Self>) -> CheckResult {
        let want_pages = (self.end.saturating_sub(FIRST)).div_ceil(PAGE);
        let fail = |detail: String| CheckResult { ok: false, detail };
        if let Some(e) = self.error {
            return fail(e);
        }
        if self.pages_seen != want_pages {
            return fail(format!(
                "memory dump covered {} of {want_pages} pages",
                self.pages_seen
            ));
        }
        let Some(passes) = self.passes.iter().copied().collect::<Option<Vec<u8>>>() else {
            return fail("memory dump did not cover the pass counter at 0x7e00".into());
        };
        let passes = u32::from_le_bytes([passes[0], passes[1], passes[2], passes[3]]);
        let p = passes as u8;
        let first = self.first.unwrap_or(0);
        let consistent = match self.step {
            // All equal: the writer is at the start (P) or a pass ended but
            // was not counted yet (P+1).
            None => first == p || first == p.wrapping_add(1),
            Some((_, v)) => v == p,
        };
        if !consistent {
            return fail(format!(
                "page bytes ({first}{}) do not match the pass counter {passes}",
                self.step
                    .map(|(at, v)| format!(" then {v} from {at:#x}"))
                    .unwrap_or_default()
            ));
        }
        CheckResult {
            ok: true,
            detail: format!(
                "{} pages consistent, {passes} passes{}",
                self.pages_seen,
                self.step
                    .map(|(at, _)| format!(", writer at {at:#x}"))
                    .unwrap_or_default()
            ),
        }
    }
}

/// The filler's contents over [1 MiB, end): page i holds 1024 copies of
/// the (i+1)-th xorshift32 output from the seed.
#[derive(Debug)]
pub struct FillerCheck {
    end: u64,
    seed: u32,
    /// The value expected in the page at `page_addr`.
    page_addr: u64,
    value: u32,
    bytes_seen: u64,
    error: Option<String>,
}

impl FillerCheck {
    /// A check of [1 MiB, `end`) for `seed`.
    pub fn new(end: u64, seed: u32) -> Self {
        FillerCheck {
            end,
            seed: seed.max(1),
            page_addr: FIRST,
            value: xorshift32(seed.max(1)),
            bytes_seen: 0,
            error: None,
        }
    }

    fn value_at(&mut self, page: u64) -> u32 {
        while self.page_addr < page {
            self.value = xorshift32(self.value);
            self.page_addr += PAGE;
        }
        self.value
    }
}

impl MemCheck for FillerCheck {
    fn feed(&mut self, addr: u64, chunk: &[u8]) {
        let start = addr.max(FIRST);
        let end = (addr + chunk.len() as u64).min(self.end);
        if start >= end || self.error.is_some() {
            if start < end {
                self.bytes_seen += end - start;
            }
            return;
        }
        self.bytes_seen += end - start;
        let mut a = start;
        while a < end {
            let page = a & !(PAGE - 1);
            let stop = (page + PAGE).min(end);
            let want = self.value_at(page).to_le_bytes();
            let bytes = &chunk[(a - addr) as usize..(stop - addr) as usize];
            if let Some(i) = bytes
                .iter()
                .enumerate()
                .position(|(i, &b)| b != want[((a + i as u64) % 4) as usize])
            {
                let at = a + i as u64;
                self.error = Some(format!(
                    "byte at {at:#x} is {:#04x}, expected {:#04x} (page value {:#010x} from seed {})",
                    bytes[i],
                    want[(at % 4) as usize],
                    u32::from_le_bytes(want),
                    self.seed
                ));
                return;
            }
            a = stop;
        }
    }

    fn finish(self: Box<Self>) -> CheckResult {
        let want = self.end.saturating_sub(FIRST);
        match self.error {
            Some(e) => CheckResult {
                ok: false,
                detail: e,
            },
            None if self.bytes_seen != want => CheckResult {
                ok: false,
                detail: format!("memory dump covered {} of {want} bytes", self.bytes_seen),
            },
            None => CheckResult {
                ok: true,
                detail: format!("{} MiB match the seed", want >> 20),
            },
        }
    }
}

/// BLAKE3 digests of the memory fed, one per 4 KiB page of guest address space,
/// to compare two VMs' memory and say where they differ.
#[derive(Default)]
pub struct DigestCheck {
    /// Finished pages: (address, digest of its bytes).
    done: Vec<(u64, [u8; 32])>,
    /// The page being hashed.
    current: Option<(u64, blake3::Hasher)>,
    /// Where the next byte fed is expected.
    next: u64,
    bytes: u64,
}

/// What a [`DigestCheck`] saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Digest {
    /// (page address, BLAKE3 of the bytes fed in that page), in order.
    pub pages: Vec<(u64, [u8; 32])>,
    /// How many bytes.
    pub bytes: u64,
}

impl DigestCheck {
    /// Feeds a chunk (see [`MemCheck::feed`]).
    pub fn feed(&mut self, mut addr: u64, mut chunk: &[u8]) {
        self.bytes += chunk.len() as u64;
        while !chunk.is_empty() {
            let page = addr & !(PAGE - 1);
            if self.current.as_ref().is_none_or(|(m, _)| *m != page) {
                if let Some((m, h)) = self.current.take() {
                    self.done.push((m, *h.finalize().as_bytes()));
                }
                self.current = Some((page, blake3::Hasher::new()));
            }
            let n = ((page + PAGE - addr) as usize).min(chunk.len());
            let h = &mut self.current.as_mut().expect("set above").1;
            // Where a run of bytes starts is hashed too (the same bytes
            // elsewhere are other memory), but not where a read happened
            // to split it.
            if addr != self.next || addr == page {
                h.update(&addr.to_le_bytes());
            }
            h.update(&chunk[..n]);
            addr += n as u64;
            self.next = addr;
            chunk = &chunk[n..];
        }
    }

    /// The digests.
    pub fn finish(&self) -> Digest {
        let mut pages = self.done.clone();
        if let Some((m, h)) = &self.current {
            pages.push((*m, *h.finalize().as_bytes()));
        }
        Digest {
            pages,
            bytes: self.bytes,
        }
    }
}

/// Compares the digests of the source's and the destination's memory.
pub fn compare_digests(src: &Digest, dst: &Digest) -> CheckResult {
    if src.bytes == 0 {
        return CheckResult {
            ok: false,
            detail: "the source's memory dump was empty".into(),
        };
    }
    if src.bytes != dst.bytes || src.pages.len() != dst.pages.len() {
        return CheckResult {
            ok: false,
            detail: format!(
                "dumps differ in size: source {} bytes, destination {}",
                src.bytes, dst.bytes
            ),
        };
    }
    let differ: Vec<u64> = src
        .pages
        .iter()
        .zip(&dst.pages)
        .filter(|(s, d)| s != d)
        .map(|(s, _)| s.0)
        .collect();
    match differ.first() {
        None => CheckResult {
            ok: true,
            detail: format!("{} MiB identical to the source", src.bytes >> 20),
        },
        Some(first) => CheckResult {
            ok: false,
            detail: format!(
                "destination memory differs from the source's in {} of {} pages, first at {first:#x}",
                differ.len(),
                src.pages.len()
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Synthetic incrementer memory [0, end): counter `passes`, pages before
    /// `writer` hold passes+1, the rest `passes`.
    fn inc_memory(end: u64, passes: u32, writer: u64) -> Vec<u8> {
        let mut m = vec![0u8; end as usize];
        m[PASSES_ADDR as usize..PASSES_ADDR as usize + 4].copy_from_slice(&passes.to_le_bytes());
        let mut p = FIRST;
        while p < end {
            m[p as usize] = if p < writer {
                passes.wrapping_add(1) as u8
            } else {
                passes as u8
            };
            m[p as usize + 1] = 0xee; // only the first byte counts
            p += PAGE;
        }
        m
    }

    fn run(check: Box<dyn MemCheck>, mem: &[u8], chunk: usize) -> CheckResult {
        let mut check = check;
        for (i, c) in mem.chunks(chunk).enumerate() {
            check.feed((i * chunk) as u64, c);
        }
        check.finish()
    }

    #[test]
    fn sectors_are_boot_sectors_with_params() {
        for k in [GuestKind::Incrementer, GuestKind::Filler, GuestKind::Idle] {
            let s = sector(
                k,
                GuestParams {
                    end: 0x4000_0000,
                    seed: 7,
                    n: 3,
                },
            );
            assert_eq!(&s[510..], &[0x55, 0xaa]);
            assert_eq!(&s[0x1f0..0x1f4], &0x4000_0000u32.to_le_bytes());
            assert_eq!(&s[0x1f4..0x1f8], &7u32.to_le_bytes());
            assert_eq!(&s[0x1f8..0x1fc], &3u32.to_le_bytes());
            // The code starts with cli and does not run into the params.
            assert_eq!(s[0], 0xfa, "{k}");
        }
    }

    #[test]
    fn xorshift_matches_reference_values() {
        // x=1: 1 ^ 1<<13 = 0x2001; ^ >>17 = 0x2001; ^ <<5 = 0x42021.
        assert_eq!(xorshift32(1), 0x0004_2021);
        assert_ne!(xorshift32(0x1234_5678), 0x1234_5678);
    }

    #[test]
    fn incrementer_check_accepts_every_writer_position() {
        let end = FIRST + 64 * PAGE;
        for writer in [FIRST, FIRST + PAGE, FIRST + 63 * PAGE, end] {
            for passes in [0u32, 255, 256, 1000] {
                let m = inc_memory(end, passes, writer);
                let r = run(Box::new(IncrementerCheck::new(end)), &m, 4096 * 3 + 17);
                assert!(r.ok, "writer {writer:#x} passes {passes}: {}", r.detail);
            }
        }
    }

    #[test]
    fn incrementer_position_is_passes_plus_the_written_fraction() {
        let end = FIRST + 64 * PAGE;
        let pos = |m: &[u8]| {
            let mut c = IncrementerCheck::new(end);
            for (i, ch) in m.chunks(5000).enumerate() {
                MemCheck::feed(&mut c, (i * 5000) as u64, ch);
            }
            c.position()
        };
        assert_eq!(pos(&inc_memory(end, 7, FIRST + 16 * PAGE)), Some(7.25));
        assert_eq!(pos(&inc_memory(end, 300, FIRST)), Some(300.0));
        // A pass written whole but not counted yet.
        assert_eq!(pos(&inc_memory(end, 7, end)), Some(8.0));
        // Inconsistent memory or a short dump has no position.
        let mut m = inc_memory(end, 7, FIRST + 16 * PAGE);
        m[(FIRST + 40 * PAGE) as usize] = 99;
        assert_eq!(pos(&m), None);
        let m = inc_memory(end, 7, FIRST + 16 * PAGE);
        assert_eq!(pos(&m[..(FIRST + 10 * PAGE) as usize]), None);
    }

    #[test]
    fn incrementer_check_finds_a_stale_page() {
        let end = FIRST + 64 * PAGE;
        let mut m = inc_memory(end, 9, FIRST + 40 * PAGE);
        m[(FIRST + 10 * PAGE) as usize] = 9; // a page that missed its update
        let r = run(Box::new(IncrementerCheck::new(end)), &m, 1 << 16);
        assert!(!r.ok);
        assert!(r.detail.contains("second step"), "{}", r.detail);
    }

    #[test]
    fn incrementer_check_finds_a_wrong_counter_and_short_dumps() {
        let end = FIRST + 64 * PAGE;
        let mut m = inc_memory(end, 9, FIRST + 40 * PAGE);
        m[PASSES_ADDR as usize] = 20;
        let r = run(Box::new(IncrementerCheck::new(end)), &m, 1 << 16);
        assert!(!r.ok && r.detail.contains("pass counter"), "{}", r.detail);
        let m = inc_memory(end, 9, FIRST + 40 * PAGE);
        let r = run(
            Box::new(IncrementerCheck::new(end)),
            &m[..(FIRST + 10 * PAGE) as usize],
            1 << 16,
        );
        assert!(!r.ok && r.detail.contains("covered"), "{}", r.detail);
        let r = run(
            Box::new(IncrementerCheck::new(end)),
            &m[FIRST as usize..],
            1 << 16,
        );
        assert!(!r.ok, "a dump without the counter must fail");
    }

    #[test]
    fn incrementer_check_rejects_a_jump() {
        let end = FIRST + 8 * PAGE;
        let mut m = inc_memory(end, 5, end);
        m[(FIRST + 3 * PAGE) as usize] = 3; // two steps down
        let r = run(Box::new(IncrementerCheck::new(end)), &m, 4096);
        assert!(!r.ok && r.detail.contains("not one step"), "{}", r.detail);
    }

    fn filler_memory(end: u64, seed: u32) -> Vec<u8> {
        let mut m = vec![0xabu8; end as usize];
        let mut x = seed;
        let mut p = FIRST;
        while p < end {
            x = xorshift32(x);
            for w in m[p as usize..(p + PAGE) as usize].chunks_mut(4) {
                w.copy_from_slice(&x.to_le_bytes());
            }
            p += PAGE;
        }
        m
    }

    #[test]
    fn filler_check_accepts_the_fill_and_finds_one_wrong_byte() {
        let end = FIRST + 32 * PAGE;
        let mut m = filler_memory(end, 99);
        let r = run(Box::new(FillerCheck::new(end, 99)), &m, 1000);
        assert!(r.ok, "{}", r.detail);
        let r = run(Box::new(FillerCheck::new(end, 98)), &m, 1 << 20);
        assert!(!r.ok, "another seed must not match");
        m[(FIRST + 17 * PAGE + 5) as usize] ^= 1;
        let r = run(Box::new(FillerCheck::new(end, 99)), &m, 1 << 20);
        assert!(!r.ok);
        assert!(
            r.detail.contains(&format!("{:#x}", FIRST + 17 * PAGE + 5)),
            "{}",
            r.detail
        );
        let r = run(
            Box::new(FillerCheck::new(end, 99)),
            &m[..FIRST as usize + 100],
            64,
        );
        assert!(!r.ok && r.detail.contains("covered"), "{}", r.detail);
    }

    #[test]
    fn digests_compare_contents_and_addresses() {
        let a = vec![7u8; 1 << 16];
        let mut b = a.clone();
        let split = |m: &[u8], base: u64, piece: usize| {
            let mut d = DigestCheck::default();
            for (i, c) in m.chunks(piece).enumerate() {
                d.feed(base + (i * piece) as u64, c);
            }
            d.finish()
        };
        let digest = |m: &[u8], base: u64| split(m, base, 5000);
        assert!(compare_digests(&digest(&a, 0), &digest(&b, 0)).ok);
        // How reads split the stream does not matter.
        assert_eq!(split(&a, 0, 5000), split(&a, 0, 4096));
        b[40000] = 8;
        assert!(!compare_digests(&digest(&a, 0), &digest(&b, 0)).ok);
        assert!(!compare_digests(&digest(&a, 0), &digest(&a, 4096)).ok);
        assert!(!compare_digests(&digest(&a, 0), &digest(&a[..4096], 0)).ok);
        assert!(!compare_digests(&digest(&[], 0), &digest(&[], 0)).ok);
        // Where: the MiB of the changed byte.
        let big = vec![1u8; 3 << 20];
        let mut other = big.clone();
        other[(2 << 20) + 5] = 0;
        let r = compare_digests(&digest(&big, 0), &digest(&other, 0));
        assert!(
            r.detail.contains("in 1 of 768 pages, first at 0x200000"),
            "{}",
            r.detail
        );
    }
}
