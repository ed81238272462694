//! Which pages of this process's anonymous memory were ever written: the
//! rest read as zeros without being read.
//!
//! A private anonymous page that is neither in memory nor swapped out has
//! never been written since it was mapped (or was discarded): it reads as
//! zeros. `PAGEMAP_SCAN` lists the pages that are in memory or swapped out
//! (pages mapped to the shared zero page, which were only read, count as
//! zero), walking only page tables that exist, so an idle terabyte costs a
//! few page-table walks. Shared and file mappings are refused: their pages
//! can hold data that is not mapped in this process.
//!
//! Memory backed by a file (a memfd) is asked of the file instead: its
//! holes (`SEEK_HOLE`) were never written and read as zeros, and reading
//! them through a shared mapping would allocate a page for each (shmem has
//! no shared zero page), so skipping them also keeps an idle guest's source
//! from growing to its full size during a migration.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use super::uffd::{
    PageRegion, Pagemap, ScanRequest, PAGE_IS_PFNZERO, PAGE_IS_PRESENT, PAGE_IS_SWAPPED,
};

/// Regions asked of the kernel per `PAGEMAP_SCAN` call.
const REGIONS_PER_CALL: usize = 1024;

/// Byte ranges `[start, end)` (addresses) of `[addr, addr + len)` that may
/// hold data; every other page there reads as zeros. `None` when that
/// cannot be known: the range is not wholly private anonymous memory, or
/// the kernel lacks `PAGEMAP_SCAN` (Linux 6.7+).
///
/// The answer is a snapshot: a page written after the call is not in it,
/// so a caller must track writes from before the call (a dirty tracker
/// started earlier) to use it.
pub fn populated(addr: u64, len: u64) -> io::Result<Option<Vec<(u64, u64)>>> {
    let Some(end) = addr.checked_add(len) else {
        return Ok(None);
    };
    if len == 0 || !addr.is_multiple_of(4096) || !end.is_multiple_of(4096) {
        return Ok(None);
    }
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    if !private_anonymous(&maps, addr, end) {
        return Ok(None);
    }
    let Ok(pm) = Pagemap::open() else {
        return Ok(None);
    };
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut buf: Vec<PageRegion> = Vec::with_capacity(REGIONS_PER_CALL);
    let mut at = addr;
    while at < end {
        let req = ScanRequest {
            start: at,
            end,
            category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            return_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED | PAGE_IS_PFNZERO,
            ..Default::default()
        };
        let walk_end = match pm.scan(&req, &mut buf) {
            Ok(w) => w,
            Err(e) if e.raw_os_error() == Some(libc::ENOTTY) => return Ok(None),
            Err(e) => return Err(e),
        };
        for r in &buf {
            // Present only as the shared zero page: never written.
            if r.categories & (PAGE_IS_PRESENT | PAGE_IS_SWAPPED | PAGE_IS_PFNZERO)
                == PAGE_IS_PRESENT | PAGE_IS_PFNZERO
            {
                continue;
            }
            match out.last_mut() {
                Some(last) if last.1 == r.start => last.1 = r.end,
                _ => out.push((r.start, r.end)),
            }
        }
        if walk_end <= at {
            return Err(io::Error::other(format!(
                "PAGEMAP_SCAN did not advance at {at:#x}"
            )));
        }
        at = walk_end;
    }
    Ok(Some(out))
}

/// Byte ranges `[start, end)` (offsets in `file`) of `[offset, offset +
/// len)` that may hold data, rounded out to whole pages; the rest of the
/// range is holes that read as zeros. Pages swapped out count as data.
/// `None` when the file system cannot say (`SEEK_DATA` unsupported).
///
/// As for [`populated`], the answer is a snapshot: a caller must track
/// writes from before the call.
pub fn file_data(file: &File, offset: u64, len: u64) -> io::Result<Option<Vec<(u64, u64)>>> {
    let Some(end) = offset.checked_add(len) else {
        return Ok(None);
    };
    const PAGE: u64 = 4096;
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut at = offset;
    while at < end {
        let data = match seek(file, at, libc::SEEK_DATA) {
            Ok(d) => d,
            // No data at or after `at`: the rest is a hole.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(None),
            Err(e) => return Err(e),
        };
        if data >= end {
            break;
        }
        let hole = match seek(file, data, libc::SEEK_HOLE) {
            Ok(h) => h,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => end,
            Err(e) => return Err(e),
        };
        if hole <= data {
            return Err(io::Error::other(format!(
                "SEEK_HOLE did not advance at {data:#x}"
            )));
        }
        let (a, b) = (
            (data / PAGE * PAGE).max(offset),
            hole.div_ceil(PAGE).saturating_mul(PAGE).min(end),
        );
        match out.last_mut() {
            Some(last) if last.1 >= a => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
        at = hole;
    }
    Ok(Some(out))
}

/// `lseek(file, at, whence)`. Moves the file's offset, which livemig never
/// reads or writes through (guest memory files are mapped, and files are
/// read and written at explicit offsets).
fn seek(file: &File, at: u64, whence: libc::c_int) -> io::Result<u64> {
    let at = libc::off_t::try_from(at).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: lseek on a descriptor `file` keeps open for the call; it
    // touches no memory of this process.
    let r = unsafe { libc::lseek(file.as_raw_fd(), at, whence) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as u64)
}

/// True when `[start, end)` is covered, without a gap, by private
/// anonymous mappings in `maps` (the text of `/proc/self/maps`): private
/// (`p`), no file (inode 0), and no name or a bracketed one (`[heap]`,
/// `[anon:...]`). Shared memory, memfd and hugetlbfs mappings have an
/// inode and are refused.
fn private_anonymous(maps: &str, start: u64, end: u64) -> bool {
    let mut covered = start;
    for line in maps.lines() {
        let mut f = line.split_ascii_whitespace();
        let (Some(range), Some(perms), Some(_off), Some(_dev), Some(inode)) =
            (f.next(), f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        let name = f.next();
        let Some((lo, hi)) = range.split_once('-') else {
            continue;
        };
        let (Ok(lo), Ok(hi)) = (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16)) else {
            continue;
        };
        if hi <= covered || lo > covered {
            continue;
        }
        let anon = perms.ends_with('p') && inode == "0" && name.is_none_or(|n| n.starts_with('['));
        if !anon {
            return false;
        }
        covered = hi;
        if covered >= end {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::mmap::AnonMapping;

    const MAPS: &str = "\
55d0a0000000-55d0a0021000 rw-p 00000000 00:00 0                          [heap]
7f0000000000-7f0000200000 rw-p 00000000 00:00 0 
7f0000200000-7f0000400000 rw-p 00000000 00:00 0 
7f0000400000-7f0000600000 rw-s 00000000 00:01 4242                       /memfd:guest (deleted)
7f0000600000-7f0000800000 r--p 00000000 08:01 1234                       /usr/lib/libc.so.6
7f0000900000-7f0000a00000 rw-p 00000000 00:00 0 
";

    #[test]
    fn maps_accept_only_private_anonymous_ranges_without_gaps() {
        assert!(private_anonymous(MAPS, 0x7f00_0000_0000, 0x7f00_0040_0000));
        assert!(private_anonymous(MAPS, 0x7f00_0010_0000, 0x7f00_0030_0000));
        assert!(private_anonymous(MAPS, 0x55d0_a000_0000, 0x55d0_a000_1000));
        assert!(
            !private_anonymous(MAPS, 0x7f00_0030_0000, 0x7f00_0050_0000),
            "memfd"
        );
        assert!(
            !private_anonymous(MAPS, 0x7f00_0060_0000, 0x7f00_0060_1000),
            "file"
        );
        assert!(
            !private_anonymous(MAPS, 0x7f00_0080_0000, 0x7f00_0090_1000),
            "gap"
        );
        assert!(!private_anonymous(MAPS, 0x1000, 0x2000), "unmapped");
    }

    #[test]
    fn only_written_pages_are_reported() {
        const P: usize = 4096;
        let m = AnonMapping::new(64 * P).unwrap();
        // 4 KiB pages only, so one write populates one page.
        m.advise(0, 64 * P, libc::MADV_NOHUGEPAGE).unwrap();
        let r = crate::sys::mmap::RawRegion::from_mapping(std::sync::Arc::new(m));
        let base = r.host_addr();
        assert!(r.write(3 * P, &[1]));
        assert!(r.write(4 * P + 17, &[2]));
        assert!(
            r.write(40 * P, &[0]),
            "a written zero still counts as written"
        );
        let mut b = [0u8; 8];
        assert!(r.read(20 * P, &mut b), "only read: the shared zero page");
        let got = match populated(base, 64 * P as u64) {
            Ok(Some(v)) => v,
            Ok(None) => {
                eprintln!("skipped: no PAGEMAP_SCAN on this kernel");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        let rel: Vec<(u64, u64)> = got.iter().map(|&(a, b)| (a - base, b - base)).collect();
        assert_eq!(
            rel,
            vec![(3 * P as u64, 5 * P as u64), (40 * P as u64, 41 * P as u64)]
        );
        // A sub-range sees only its part.
        let part = populated(base + 4 * P as u64, 8 * P as u64)
            .unwrap()
            .unwrap();
        assert_eq!(part, vec![(base + 4 * P as u64, base + 5 * P as u64)]);
    }

    #[test]
    fn refuses_what_it_cannot_know() {
        // A Rust heap buffer may share a VMA with anything; a misaligned
        // range is refused outright.
        assert!(populated(4097, 4096).unwrap().is_none());
        assert!(populated(4096, 0).unwrap().is_none());
        let f = crate::sys::shm::create_memfd(c"residency-test", 1 << 16).unwrap();
        let m = crate::sys::shm::SharedMapping::map(&f, 1 << 16).unwrap();
        let addr = m.word(0).unwrap() as *const _ as u64;
        assert!(populated(addr, 1 << 16).unwrap().is_none(), "memfd");
    }

    #[test]
    fn file_holes_are_untouched_pages() {
        let f = crate::sys::memfd::create("residency-test", 64 * 4096).unwrap();
        let none = file_data(&f, 0, 64 * 4096).unwrap().expect("shmem answers");
        assert!(none.is_empty(), "a new memfd is one hole: {none:?}");
        use std::os::unix::fs::FileExt;
        f.write_all_at(&[1], 3 * 4096 + 17).unwrap();
        f.write_all_at(&[1; 8192], 10 * 4096).unwrap();
        f.write_all_at(&[1], 63 * 4096).unwrap();
        let all = file_data(&f, 0, 64 * 4096).unwrap().unwrap();
        assert_eq!(
            all,
            vec![
                (3 * 4096, 4 * 4096),
                (10 * 4096, 12 * 4096),
                (63 * 4096, 64 * 4096)
            ]
        );
        // A window inside the file, cutting a data range.
        let part = file_data(&f, 11 * 4096, 4 * 4096).unwrap().unwrap();
        assert_eq!(part, vec![(11 * 4096, 12 * 4096)]);
        // Zeros written are data (the kernel cannot tell): never skipped.
        f.write_all_at(&[0; 4096], 20 * 4096).unwrap();
        let z = file_data(&f, 20 * 4096, 4096).unwrap().unwrap();
        assert_eq!(z, vec![(20 * 4096, 21 * 4096)]);
    }
}
