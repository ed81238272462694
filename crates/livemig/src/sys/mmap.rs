//! Anonymous and shared-file mappings, and raw access to host memory that
//! backs guest RAM.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::Arc;

/// Maps `len` bytes read-write at an address the kernel picks: the first
/// `len` bytes of `file`, shared (writes are seen by every process mapping
/// it), or without a file zeroed anonymous memory, private and lazily
/// allocated.
pub(super) fn map_rw(len: usize, file: Option<&File>) -> io::Result<NonNull<u8>> {
    map_rw_at(len, file, 0)
}

/// As [`map_rw`], the file mapped from `offset` (a multiple of the page
/// size).
fn map_rw_at(len: usize, file: Option<&File>, offset: u64) -> io::Result<NonNull<u8>> {
    if len == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "cannot map 0 bytes",
        ));
    }
    let (flags, fd) = match file {
        Some(f) => (libc::MAP_SHARED, f.as_raw_fd()),
        None => (
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
        ),
    };
    // SAFETY: a fresh mapping at a kernel-chosen address (no MAP_FIXED), so
    // no existing memory is affected; `fd` is -1 (anonymous) or a
    // descriptor `file` keeps open over the call. The result is checked
    // for MAP_FAILED.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            fd,
            offset_arg(offset)?,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(p.cast::<u8>()).ok_or_else(io::Error::last_os_error)
}

fn offset_arg(offset: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(offset)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file offset too large"))
}

/// Applies `madvise(advice)` to `len` bytes at `ptr`.
///
/// # Safety
/// `ptr..ptr + len` must lie inside one live mapping of this process.
unsafe fn advise_range(ptr: *mut u8, len: usize, advice: libc::c_int) -> io::Result<()> {
    // SAFETY: the range is mapped (the caller's contract). Advice may at
    // most change the bytes (MADV_DONTNEED zeroes them), and this memory
    // holds plain bytes read only through copies and scans, never Rust
    // values: nothing is invalidated.
    let r = unsafe { libc::madvise(ptr.cast(), len, advice) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Unmaps the `len` bytes at `ptr`.
///
/// # Safety
/// `ptr` and `len` must be a mapping [`map_rw`] returned, whole, and
/// nothing may access it afterwards.
pub(super) unsafe fn unmap(ptr: NonNull<u8>, len: usize) {
    // SAFETY: exactly a range mmap returned, no longer used (the caller's
    // contract).
    unsafe {
        libc::munmap(ptr.as_ptr().cast(), len);
    }
}

/// True when `[offset, offset + n)` lies within `len` bytes.
pub(super) fn in_range(len: usize, offset: usize, n: usize) -> bool {
    offset.checked_add(n).is_some_and(|e| e <= len)
}

/// Copies `dst.len()` bytes at `offset` of the `len` bytes at `base` into
/// `dst`. False (nothing copied) if out of range.
///
/// # Safety
/// `base..base + len` must be mapped readable over the call and must not
/// overlap `dst`.
pub(super) unsafe fn copy_out(
    base: NonNull<u8>,
    len: usize,
    offset: usize,
    dst: &mut [u8],
) -> bool {
    if !in_range(len, offset, dst.len()) {
        return false;
    }
    // SAFETY: the source range is inside `base..base + len` (checked),
    // readable and apart from `dst` by the caller's contract.
    unsafe {
        std::ptr::copy_nonoverlapping(base.as_ptr().add(offset), dst.as_mut_ptr(), dst.len())
    };
    true
}

/// Copies `src` to `offset` of the `len` bytes at `base`. False (nothing
/// copied) if out of range.
///
/// # Safety
/// `base..base + len` must be mapped writable over the call and must not
/// overlap `src`.
pub(super) unsafe fn copy_in(base: NonNull<u8>, len: usize, offset: usize, src: &[u8]) -> bool {
    if !in_range(len, offset, src.len()) {
        return false;
    }
    // SAFETY: the destination range is inside `base..base + len`
    // (checked), writable and apart from `src` by the caller's contract.
    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), base.as_ptr().add(offset), src.len()) };
    true
}

/// An anonymous private mapping, unmapped on drop.
#[derive(Debug)]
pub struct AnonMapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; the pointer is
// never handed out as a Rust reference, only used through `RawRegion`.
unsafe impl Send for AnonMapping {}
// SAFETY: as above; shared access goes through copy functions.
unsafe impl Sync for AnonMapping {}

impl AnonMapping {
    /// Maps `len` bytes of zeroed, lazily allocated anonymous memory.
    pub fn new(len: usize) -> io::Result<Self> {
        let ptr = map_rw(len, None)?;
        Ok(AnonMapping { ptr, len })
    }

    /// Start address of the mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a zero-length mapping (never: `new` refuses it).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Applies `madvise(advice)` to the byte range `[offset, offset + len)`.
    pub fn advise(&self, offset: usize, len: usize, advice: libc::c_int) -> io::Result<()> {
        if offset.checked_add(len).is_none_or(|e| e > self.len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "range outside mapping",
            ));
        }
        // SAFETY: the range lies inside our own mapping (checked above).
        unsafe { advise_range(self.ptr.as_ptr().add(offset), len, advice) }
    }
}

impl Drop for AnonMapping {
    fn drop(&mut self) {
        // SAFETY: the whole range `map_rw` returned; nothing refers to it
        // once the last owner (this value) goes.
        unsafe { unmap(self.ptr, self.len) }
    }
}

/// A shared mapping of a range of a file (a memfd holding guest memory),
/// unmapped on drop. Keeps the file open: the descriptor can be handed to
/// another process, which then maps the same pages.
#[derive(Debug)]
pub struct FileMapping {
    ptr: NonNull<u8>,
    len: usize,
    file: Arc<File>,
    offset: u64,
}

// SAFETY: as for AnonMapping: plain memory owned by this value, accessed
// only through `RawRegion`'s copies and scans.
unsafe impl Send for FileMapping {}
// SAFETY: as above.
unsafe impl Sync for FileMapping {}

impl FileMapping {
    /// Maps `len` bytes of `file` from `offset` (a multiple of the page
    /// size), shared and read-write.
    pub fn new(file: Arc<File>, offset: u64, len: usize) -> io::Result<Self> {
        let ptr = map_rw_at(len, Some(&file), offset)?;
        Ok(FileMapping {
            ptr,
            len,
            file,
            offset,
        })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a zero-length mapping (never: `new` refuses it).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The file mapped.
    pub fn file(&self) -> &Arc<File> {
        &self.file
    }

    /// Where in the file the mapping starts.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Applies `madvise(advice)` to the whole mapping (e.g. MADV_HUGEPAGE).
    pub fn advise(&self, advice: libc::c_int) -> io::Result<()> {
        // SAFETY: exactly our own live mapping.
        unsafe { advise_range(self.ptr.as_ptr(), self.len, advice) }
    }
}

impl Drop for FileMapping {
    fn drop(&mut self) {
        // SAFETY: the whole range `map_rw_at` returned; nothing refers to
        // it once the last owner (this value) goes.
        unsafe { unmap(self.ptr, self.len) }
    }
}

/// A range of host memory that backs guest RAM and may be written
/// concurrently by a guest, so it is only ever copied, never borrowed as a
/// Rust slice for longer than one copy or scan.
///
/// Keeps its owner (the mapping) alive through an `Arc`.
#[derive(Clone)]
pub struct RawRegion {
    ptr: NonNull<u8>,
    len: usize,
    _owner: Arc<dyn Send + Sync>,
}

impl std::fmt::Debug for RawRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawRegion")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .finish()
    }
}

// SAFETY: the region is plain memory kept alive by `_owner`, which is
// Send + Sync; all access is by bounds-checked copies.
unsafe impl Send for RawRegion {}
// SAFETY: as above.
unsafe impl Sync for RawRegion {}

impl RawRegion {
    /// A region covering a whole anonymous mapping.
    pub fn from_mapping(m: Arc<AnonMapping>) -> Self {
        RawRegion {
            ptr: m.ptr,
            len: m.len,
            _owner: m,
        }
    }

    /// A region over `len` bytes at `offset` of an anonymous mapping, or
    /// `None` if that range is not inside it. Regions carved from one
    /// mapping are adjacent in the host's address space.
    pub fn from_mapping_range(m: Arc<AnonMapping>, offset: usize, len: usize) -> Option<Self> {
        if !in_range(m.len, offset, len) {
            return None;
        }
        // SAFETY: `offset + len <= m.len` (checked), so the pointer stays
        // inside the mapping and is non-null.
        let ptr = unsafe { NonNull::new_unchecked(m.ptr.as_ptr().add(offset)) };
        Some(RawRegion {
            ptr,
            len,
            _owner: m,
        })
    }

    /// A region covering a whole shared file mapping.
    pub fn from_file_mapping(m: Arc<FileMapping>) -> Self {
        RawRegion {
            ptr: m.ptr,
            len: m.len,
            _owner: m,
        }
    }

    /// A region over memory owned by someone else (a VMM's mapping).
    ///
    /// # Safety
    /// `ptr..ptr+len` must be mapped readable and writable for as long as
    /// `owner` lives, and not unmapped by anyone else meanwhile.
    pub unsafe fn from_raw(ptr: NonNull<u8>, len: usize, owner: Arc<dyn Send + Sync>) -> Self {
        RawRegion {
            ptr,
            len,
            _owner: owner,
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for an empty region.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Start address in this process (for ioctls that register memory).
    pub fn host_addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// Puts the `len()` bytes of `file` from `offset` (page-aligned) in
    /// place of this region's memory, at the same address (`MAP_FIXED`,
    /// shared): from then on the region reads and writes the file's pages,
    /// and whoever maps the same file sees the same bytes. The range stays
    /// mapped throughout (the kernel swaps the pages atomically), so other
    /// holders of the region and a VMM's KVM slot over it keep working
    /// (KVM drops its old translations through its MMU notifier). The old
    /// contents are dropped. For a paused destination taking over a
    /// source's guest memory.
    pub fn replace_with_file(&self, file: &File, offset: u64) -> io::Result<()> {
        let off = offset_arg(offset)?;
        // SAFETY: MAP_FIXED over exactly this region, which is a live
        // read-write mapping of this process for as long as `_owner`
        // lives: the same range is mapped read-write again, so every
        // pointer into it stays valid; nothing outside it is touched. The
        // bytes are plain data (any value is valid), and every access
        // goes through copies or short scans that tolerate concurrent
        // change. `file` is open over the call.
        let p = unsafe {
            libc::mmap(
                self.ptr.as_ptr().cast(),
                self.len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                file.as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Puts fresh zeroed anonymous memory in place of this region's memory
    /// (`MAP_FIXED`, private): undoes [`RawRegion::replace_with_file`]
    /// without writing a byte of the file.
    pub fn replace_with_anonymous(&self) -> io::Result<()> {
        // SAFETY: as in `replace_with_file`: the same live range, mapped
        // read-write again, private anonymous memory this time.
        let p = unsafe {
            libc::mmap(
                self.ptr.as_ptr().cast(),
                self.len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn check(&self, offset: usize, len: usize) -> bool {
        in_range(self.len, offset, len)
    }

    /// Copies `dst.len()` bytes at `offset` into `dst`. False if out of range.
    pub fn read(&self, offset: usize, dst: &mut [u8]) -> bool {
        // SAFETY: the region is a live mapping (kept by `_owner`) and
        // cannot overlap `dst`, a Rust buffer. A guest writing concurrently
        // can only make the copy a mix of old and new bytes; the dirty log
        // then has the page marked and it is sent again.
        unsafe { copy_out(self.ptr, self.len, offset, dst) }
    }

    /// Appends the `len` bytes at `offset` to `dst` without initialising
    /// the new space first. False (and `dst` unchanged) if out of range.
    pub fn append_to(&self, offset: usize, len: usize, dst: &mut Vec<u8>) -> bool {
        if !self.check(offset, len) {
            return false;
        }
        dst.reserve(len);
        let at = dst.len();
        // SAFETY: the source range is inside the live mapping (checked); the
        // destination is `len` bytes of spare capacity just reserved in a
        // Rust vector, which cannot overlap the mapping. After the copy those
        // bytes are initialised, so the length may cover them.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().add(offset),
                dst.as_mut_ptr().add(at),
                len,
            );
            dst.set_len(at + len);
        }
        true
    }

    /// Copies `src` to `offset`. False if out of range.
    pub fn write(&self, offset: usize, src: &[u8]) -> bool {
        // SAFETY: the region is a live mapping (kept by `_owner`), which is
        // writable, and cannot overlap `src`, a Rust buffer.
        unsafe { copy_in(self.ptr, self.len, offset, src) }
    }

    /// One `src.read` straight into `[offset, offset + len)` (a socket's
    /// bytes land in place, with no buffer in between). Returns what the
    /// read returned; an error if the range is outside the region.
    pub fn read_from<R: std::io::Read + ?Sized>(
        &self,
        offset: usize,
        len: usize,
        src: &mut R,
    ) -> io::Result<usize> {
        if !self.check(offset, len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "range outside the region",
            ));
        }
        // SAFETY: the range is inside the live, writable mapping (checked)
        // and holds plain bytes, valid for any bit pattern. The slice lives
        // only for the one `read` call, which fills it; it cannot overlap
        // `src`'s own state (a Rust value outside the mapping). A thread
        // writing the same bytes meanwhile (a guest, another channel) can
        // only leave a mix of bytes, as with `write`; the stream's checksum
        // over these bytes then fails rather than anything being trusted.
        let dst = unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(offset), len) };
        src.read(dst)
    }

    /// Runs `f` over `[offset, offset + len)` viewed as a writable slice,
    /// for a copy into place that must do more than copy (the receive
    /// path's copy and checksum in one pass). None if out of range.
    pub fn fill<T>(&self, offset: usize, len: usize, f: impl FnOnce(&mut [u8]) -> T) -> Option<T> {
        if !self.check(offset, len) {
            return None;
        }
        // SAFETY: the range is inside the live, writable mapping (checked)
        // and holds plain bytes, valid for any bit pattern. The slice lives
        // only for the call to `f` and cannot overlap a Rust buffer `f`
        // copies from. A thread writing the same bytes meanwhile (a guest,
        // another channel) can only leave a mix of bytes, as with `write`.
        let dst = unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(offset), len) };
        Some(f(dst))
    }

    /// Faults `[offset, offset + len)` in, writable, with one call
    /// (`MADV_POPULATE_WRITE`, Linux 5.14+), as if each page had been
    /// written, without changing any contents. Pages already present stay
    /// as they are.
    pub fn populate_write(&self, offset: usize, len: usize) -> io::Result<()> {
        const MADV_POPULATE_WRITE: libc::c_int = 23;
        if !self.check(offset, len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "range outside the region",
            ));
        }
        // SAFETY: the range is inside the live mapping (checked);
        // MADV_POPULATE_WRITE only allocates and maps pages that are not
        // present yet (zeroed), so no byte anyone can read changes.
        let r = unsafe {
            libc::madvise(
                self.ptr.as_ptr().add(offset).cast(),
                len,
                MADV_POPULATE_WRITE,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Whether the page at `offset` is in memory (`mincore`): one cheap
    /// call, no page-table walk of a whole range. `None` when out of range
    /// or the kernel refuses.
    pub fn resident(&self, offset: usize) -> Option<bool> {
        const PAGE: usize = 4096;
        let page = offset - offset % PAGE;
        if !self.check(page, PAGE) {
            return None;
        }
        let mut vec = [0u8; 1];
        // SAFETY: the page is inside the live mapping (checked) and
        // page-aligned (the mapping is); mincore writes one byte per page
        // of the range into `vec`, which holds one.
        let r =
            unsafe { libc::mincore(self.ptr.as_ptr().add(page).cast(), PAGE, vec.as_mut_ptr()) };
        (r == 0).then_some(vec[0] & 1 != 0)
    }

    /// Byte ranges (offsets in this region) of `[offset, offset + len)`
    /// that may hold data; every other page there reads as zeros. `None`
    /// when that cannot be known (see `sys::residency::populated`):
    /// memory that is not private anonymous, or an old kernel.
    pub fn populated(&self, offset: usize, len: usize) -> Option<Vec<(usize, usize)>> {
        if !self.check(offset, len) {
            return None;
        }
        let base = self.host_addr();
        match super::residency::populated(base + offset as u64, len as u64) {
            Ok(Some(v)) => Some(
                v.into_iter()
                    .map(|(a, b)| ((a - base) as usize, (b - base) as usize))
                    .collect(),
            ),
            Ok(None) => None,
            Err(e) => {
                log::debug!("cannot tell which pages were written: {e}");
                None
            }
        }
    }

    /// Runs `f` over the bytes at `[offset, offset+len)` viewed as a slice,
    /// for scans (zero checks, hashing) that must not copy. None if out of
    /// range. The bytes may change under a running guest; `f` must treat
    /// them as a snapshot that can be stale, never as a basis for memory
    /// safety decisions.
    pub fn scan<R>(&self, offset: usize, len: usize, f: impl FnOnce(&[u8]) -> R) -> Option<R> {
        if !self.check(offset, len) {
            return None;
        }
        // SAFETY: the range is inside the live mapping (checked). The slice
        // lives only for the call to `f`, which only reads it; the values
        // are plain bytes, valid for any bit pattern.
        let s = unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(offset), len) };
        Some(f(s))
    }
}

/// A region's file and offset, when it maps one.
#[cfg(feature = "vm-memory")]
pub type RegionFile = Option<(Arc<File>, u64)>;

/// The regions of a rust-vmm `GuestMemoryMmap`, each with its guest
/// address and its file (if mapped from one), kept mapped by a clone of
/// `mem`.
#[cfg(feature = "vm-memory")]
pub fn vm_memory_regions<B>(
    mem: &Arc<vm_memory::GuestMemoryMmap<B>>,
) -> Vec<(vm_memory::GuestAddress, RawRegion, RegionFile)>
where
    B: vm_memory::bitmap::Bitmap + Send + Sync + 'static,
{
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let mut out = Vec::new();
    for r in mem.iter() {
        let Some(ptr) = NonNull::new(r.as_ptr()) else {
            continue;
        };
        let owner: Arc<dyn Send + Sync> = mem.clone();
        // SAFETY: the region is mapped read/write by `GuestMemoryMmap` for
        // as long as `mem` lives, and `owner` (a clone of it) keeps it.
        let region = unsafe { RawRegion::from_raw(ptr, r.len() as usize, owner) };
        let file = r.file_offset().map(|f| (f.arc().clone(), f.start()));
        out.push((r.start_addr(), region, file));
    }
    out
}
