//! userfaultfd write-protection and the pagemap scan ioctl, as thin safe
//! wrappers over raw ioctls.
//!
//! Raw ioctls rather than the `userfaultfd` crate: the crate's constants
//! predate `UFFD_FEATURE_WP_ASYNC`, `UFFD_FEATURE_WP_UNPOPULATED` and
//! `PAGEMAP_SCAN` (all needed here), and its bindgen build wants libclang.
//! The structures below follow `include/uapi/linux/userfaultfd.h` and
//! `include/uapi/linux/fs.h` (Linux 6.7+ for the newest parts); each has a
//! size check against the kernel's.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};

/// `UFFD_API`: the only userfaultfd API version.
const UFFD_API: u64 = 0xAA;

/// Report write-protect faults (as opposed to missing-page faults).
pub const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
/// Write-protection also covers pages never touched (no page table entry).
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// The kernel resolves write-protect faults itself and only marks the page
/// written; userspace reads the marks with [`Pagemap::scan`].
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;

/// Report the faulting thread's id in [`UffdMsg::arg`] (postcopy blocktime).
pub const UFFD_FEATURE_THREAD_ID: u64 = 1 << 8;

/// `UFFDIO_REGISTER_MODE_MISSING`: report faults on pages with no page yet.
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
/// Bit of `_UFFDIO_COPY` (0x03) in the `ioctls` mask of a register.
const UFFDIO_COPY_BIT: u64 = 1 << 0x03;
/// Bit of `_UFFDIO_ZEROPAGE` (0x04) in the `ioctls` mask of a register.
const UFFDIO_ZEROPAGE_BIT: u64 = 1 << 0x04;

/// `UFFDIO_REGISTER_MODE_WP`: track write-protect faults in the range.
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
/// `UFFDIO_WRITEPROTECT_MODE_WP`: protect (set) rather than unprotect.
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
/// `UFFDIO_WRITEPROTECT_MODE_DONTWAKE`: do not wake threads waiting on the range.
const UFFDIO_WRITEPROTECT_MODE_DONTWAKE: u64 = 1 << 1;
/// Bit of `_UFFDIO_WRITEPROTECT` (0x06) in the `ioctls` mask of a register.
const UFFDIO_WRITEPROTECT_BIT: u64 = 1 << 0x06;

/// `UFFD_EVENT_PAGEFAULT`: [`UffdMsg::event`] of a fault.
pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// `UFFD_PAGEFAULT_FLAG_WP`: the fault hit a write-protected page.
pub const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;

/// `PM_SCAN_WP_MATCHING`: write-protect the pages the scan reports.
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// `PM_SCAN_CHECK_WPASYNC`: fail (EPERM) on memory not under async
/// userfaultfd write-protection instead of reporting it.
pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
/// `PAGE_IS_WRITTEN`: written since it was last write-protected.
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
/// `PAGE_IS_PRESENT`: backed by a page in memory.
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
/// `PAGE_IS_SWAPPED`: swapped out (holds data, not in memory).
pub const PAGE_IS_SWAPPED: u64 = 1 << 4;
/// `PAGE_IS_PFNZERO`: mapped to the shared zero page (read, never written).
pub const PAGE_IS_PFNZERO: u64 = 1 << 5;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioRange {
    start: u64,
    len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

/// `struct uffdio_writeprotect`.
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// `struct uffdio_copy`.
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

/// `struct uffdio_zeropage`.
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// `struct uffd_msg`: one event read from a userfaultfd. The kernel struct
/// is packed, but its fields fall on natural alignment, so `repr(C)` gives
/// the same 32-byte layout.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UffdMsg {
    /// `UFFD_EVENT_*`.
    pub event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    /// For a page fault: `[flags, address, thread id in the low 32 bits]`.
    pub arg: [u64; 3],
}

impl UffdMsg {
    /// `UFFD_PAGEFAULT_FLAG_*` of a page fault event.
    pub fn fault_flags(&self) -> u64 {
        self.arg[0]
    }

    /// Faulting address of a page fault event.
    pub fn fault_address(&self) -> u64 {
        self.arg[1]
    }
}

/// `struct page_region`: a run of pages `[start, end)` sharing the
/// categories in `categories`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageRegion {
    /// First byte address.
    pub start: u64,
    /// One past the last byte address.
    pub end: u64,
    /// `PAGE_IS_*` bits (restricted to the scan's return mask).
    pub categories: u64,
}

/// `struct pm_scan_arg`.
#[repr(C)]
#[derive(Debug, Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

const _: () = assert!(std::mem::size_of::<UffdioApi>() == 24);
const _: () = assert!(std::mem::size_of::<UffdioRange>() == 16);
const _: () = assert!(std::mem::size_of::<UffdioRegister>() == 32);
const _: () = assert!(std::mem::size_of::<UffdioWriteprotect>() == 24);
const _: () = assert!(std::mem::size_of::<UffdMsg>() == 32);
const _: () = assert!(std::mem::size_of::<UffdioCopy>() == 40);
const _: () = assert!(std::mem::size_of::<UffdioZeropage>() == 32);
const _: () = assert!(std::mem::size_of::<PageRegion>() == 24);
const _: () = assert!(std::mem::size_of::<PmScanArg>() == 96);

/// Request numbers (the macros make `pub fn`s; this module keeps them private).
mod nr {
    use super::{
        PmScanArg, UffdioApi, UffdioCopy, UffdioRange, UffdioRegister, UffdioWriteprotect,
        UffdioZeropage,
    };

    const UFFDIO: u32 = 0xAA;
    const PROCFS_IOCTL_MAGIC: u32 = b'f' as u32;

    vmm_sys_util::ioctl_io_nr!(USERFAULTFD_IOC_NEW, UFFDIO, 0x00);
    vmm_sys_util::ioctl_iowr_nr!(UFFDIO_API, UFFDIO, 0x3F, UffdioApi);
    vmm_sys_util::ioctl_iowr_nr!(UFFDIO_REGISTER, UFFDIO, 0x00, UffdioRegister);
    vmm_sys_util::ioctl_ior_nr!(UFFDIO_UNREGISTER, UFFDIO, 0x01, UffdioRange);
    vmm_sys_util::ioctl_ior_nr!(UFFDIO_WAKE, UFFDIO, 0x02, UffdioRange);
    vmm_sys_util::ioctl_iowr_nr!(UFFDIO_COPY, UFFDIO, 0x03, UffdioCopy);
    vmm_sys_util::ioctl_iowr_nr!(UFFDIO_ZEROPAGE, UFFDIO, 0x04, UffdioZeropage);
    vmm_sys_util::ioctl_iowr_nr!(UFFDIO_WRITEPROTECT, UFFDIO, 0x06, UffdioWriteprotect);
    vmm_sys_util::ioctl_iowr_nr!(PAGEMAP_SCAN, PROCFS_IOCTL_MAGIC, 16, PmScanArg);
}

/// Turns an ioctl's C return value into a `Result`.
fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// How a userfaultfd was obtained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UffdSource {
    /// `USERFAULTFD_IOC_NEW` on `/dev/userfaultfd` (Linux 6.1+).
    Device,
    /// The `userfaultfd(2)` system call.
    Syscall,
}

/// What `UFFDIO_API` negotiated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UffdApi {
    /// Features enabled (on a probe with no features requested: all the
    /// kernel offers).
    pub features: u64,
    /// Bit mask of the ioctls the fd accepts (`1 << _UFFDIO_*`).
    pub ioctls: u64,
}

/// A userfaultfd, opened non-blocking and close-on-exec, handling faults
/// from the kernel too (not user-mode only), so memory that KVM writes is
/// tracked as well.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    source: UffdSource,
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> libc::c_int {
        self.fd.as_raw_fd()
    }
}

impl Uffd {
    /// Opens a userfaultfd: `/dev/userfaultfd` first, then the system call.
    /// The error, if both fail, names both causes.
    pub fn open() -> io::Result<Self> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        let dev_err = match Self::open_device(flags) {
            Ok(fd) => {
                return Ok(Uffd {
                    fd,
                    source: UffdSource::Device,
                })
            }
            Err(e) => e,
        };
        // SAFETY: userfaultfd(2) takes a flags integer and returns a new fd
        // or -1; no memory is passed.
        let ret = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        if ret < 0 {
            let sys_err = io::Error::last_os_error();
            return Err(io::Error::new(
                sys_err.kind(),
                format!("/dev/userfaultfd: {dev_err}; userfaultfd(2): {sys_err}"),
            ));
        }
        let raw = libc::c_int::try_from(ret)
            .map_err(|_| io::Error::other("userfaultfd(2) returned a bad fd"))?;
        // SAFETY: the syscall just returned this fd and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(Uffd {
            fd,
            source: UffdSource::Syscall,
        })
    }

    fn open_device(flags: libc::c_int) -> io::Result<OwnedFd> {
        let dev = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open("/dev/userfaultfd")?;
        // SAFETY: USERFAULTFD_IOC_NEW takes the new fd's flags by value and
        // returns a new fd or -1; `dev` is a valid open fd.
        let raw = check(unsafe {
            ioctl_with_val(&dev, nr::USERFAULTFD_IOC_NEW(), flags as libc::c_ulong)
        })?;
        // SAFETY: the ioctl just returned this fd and nothing else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(raw) })
    }

    /// `UFFDIO_API`: enables `features` (allowed once per fd). Fails with
    /// EINVAL if the kernel lacks one of them.
    pub fn api(&self, features: u64) -> io::Result<UffdApi> {
        let mut arg = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes exactly one `uffdio_api`,
        // which `arg` is (size checked above); the fd is valid.
        check(unsafe { ioctl_with_mut_ref(self, nr::UFFDIO_API(), &mut arg) })?;
        Ok(UffdApi {
            features: arg.features,
            ioctls: arg.ioctls,
        })
    }

    /// The features this kernel offers, from a throw-away fd.
    pub fn probe_features() -> io::Result<(UffdSource, u64)> {
        let u = Self::open()?;
        let api = u.api(0)?;
        Ok((u.source, api.features))
    }

    /// `UFFDIO_REGISTER` of `[start, start + len)` for write-protect
    /// tracking. Fails with `Unsupported` if the range then does not accept
    /// `UFFDIO_WRITEPROTECT`.
    pub fn register_wp(&self, start: u64, len: u64) -> io::Result<()> {
        let mut arg = UffdioRegister {
            range: UffdioRange { start, len },
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes one `uffdio_register`
        // (`arg`); it only changes how faults in the range are handled.
        check(unsafe { ioctl_with_mut_ref(self, nr::UFFDIO_REGISTER(), &mut arg) })?;
        if arg.ioctls & UFFDIO_WRITEPROTECT_BIT == 0 {
            let _ = self.unregister(start, len);
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "registered range does not accept UFFDIO_WRITEPROTECT",
            ));
        }
        Ok(())
    }

    /// `UFFDIO_REGISTER` of `[start, start + len)` for missing-page faults
    /// (postcopy): a touch of a page that has no page yet blocks the
    /// toucher (a thread, or KVM on a vCPU's behalf) until the page is
    /// placed with [`Uffd::copy`] or [`Uffd::zeropage`]. Fails with
    /// `Unsupported` if the range then does not accept both.
    pub fn register_missing(&self, start: u64, len: u64) -> io::Result<()> {
        let mut arg = UffdioRegister {
            range: UffdioRange { start, len },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes one `uffdio_register`
        // (`arg`); it only changes how faults in the range are handled.
        check(unsafe { ioctl_with_mut_ref(self, nr::UFFDIO_REGISTER(), &mut arg) })?;
        let need = UFFDIO_COPY_BIT | UFFDIO_ZEROPAGE_BIT;
        if arg.ioctls & need != need {
            let _ = self.unregister(start, len);
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "registered range does not accept UFFDIO_COPY and UFFDIO_ZEROPAGE",
            ));
        }
        Ok(())
    }

    /// `UFFDIO_COPY`: places a copy of `src` at `dst` (page-aligned, in a
    /// range registered for missing faults, `src.len()` a whole number of
    /// pages) atomically and wakes the threads waiting on it. `EEXIST`
    /// (a page is already there) is returned as `AlreadyExists`; `EAGAIN`
    /// is retried.
    pub fn copy(&self, dst: u64, src: &[u8]) -> io::Result<()> {
        retrying(|| {
            let mut arg = UffdioCopy {
                dst,
                src: src.as_ptr() as u64,
                len: src.len() as u64,
                mode: 0,
                copy: 0,
            };
            // SAFETY: UFFDIO_COPY reads and writes one `uffdio_copy` (`arg`)
            // and reads `len` bytes at `src`, which `src` holds. It writes
            // only into pages with no page yet in a range this fd
            // registered (the kernel checks), never over existing memory.
            unsafe { ioctl_with_mut_ref(self, nr::UFFDIO_COPY(), &mut arg) }
        })
    }

    /// `UFFDIO_ZEROPAGE`: maps zeros at `[dst, dst + len)` (no page there
    /// yet) and wakes the waiters; `EEXIST` as in [`Uffd::copy`].
    pub fn zeropage(&self, dst: u64, len: u64) -> io::Result<()> {
        retrying(|| {
            let mut arg = UffdioZeropage {
                range: UffdioRange { start: dst, len },
                mode: 0,
                zeropage: 0,
            };
            // SAFETY: UFFDIO_ZEROPAGE reads and writes one `uffdio_zeropage`
            // (`arg`); it maps zeros only where no page exists yet in a
            // range this fd registered.
            unsafe { ioctl_with_mut_ref(self, nr::UFFDIO_ZEROPAGE(), &mut arg) }
        })
    }

    /// `UFFDIO_COPY` of a run of pages: places `src` at `dst` with as few
    /// ioctls as the kernel allows (one for a run where no page is there
    /// yet), skipping every page that is already there (`EEXIST`: placed
    /// by another thread) instead of failing. Wakes the threads waiting on
    /// the pages it places. Returns the pages it placed itself.
    pub fn copy_run(&self, dst: u64, src: &[u8]) -> io::Result<u64> {
        self.fill_run(dst, src.len() as u64, |at, len| {
            let off = (at - dst) as usize;
            let mut arg = UffdioCopy {
                dst: at,
                src: src[off..off + len as usize].as_ptr() as u64,
                len,
                mode: 0,
                copy: 0,
            };
            // SAFETY: UFFDIO_COPY reads and writes one `uffdio_copy` (`arg`)
            // and reads `len` bytes at `arg.src`, inside `src` (the slice
            // above). It writes only into pages with no page yet in a range
            // this fd registered (the kernel checks), never over existing
            // memory.
            let ret = unsafe { ioctl_with_mut_ref(self, nr::UFFDIO_COPY(), &mut arg) };
            (ret, arg.copy)
        })
    }

    /// `UFFDIO_ZEROPAGE` of a run of pages, as [`Uffd::copy_run`]: zeros
    /// wherever no page is there yet in `[dst, dst + len)`.
    pub fn zero_run(&self, dst: u64, len: u64) -> io::Result<u64> {
        self.fill_run(dst, len, |at, len| {
            let mut arg = UffdioZeropage {
                range: UffdioRange { start: at, len },
                mode: 0,
                zeropage: 0,
            };
            // SAFETY: UFFDIO_ZEROPAGE reads and writes one
            // `uffdio_zeropage` (`arg`); it maps zeros only where no page
            // exists yet in a range this fd registered.
            let ret = unsafe { ioctl_with_mut_ref(self, nr::UFFDIO_ZEROPAGE(), &mut arg) };
            (ret, arg.zeropage)
        })
    }

    /// Runs `ioctl(at, len)` (returning the ioctl's result and the bytes it
    /// reports done, or a negative errno) over `[dst, dst + len)` until
    /// every page is placed or was there: a partial run (`EAGAIN` with
    /// bytes done) goes on after them, a page already there (`EEXIST` at
    /// the run's first page) is skipped.
    fn fill_run(
        &self,
        dst: u64,
        len: u64,
        mut ioctl: impl FnMut(u64, u64) -> (libc::c_int, i64),
    ) -> io::Result<u64> {
        const PAGE: u64 = 4096;
        let (mut at, end) = (dst, dst + len);
        let mut placed = 0;
        while at < end {
            let (ret, done) = ioctl(at, end - at);
            if ret >= 0 {
                placed += (end - at) / PAGE;
                break;
            }
            let e = io::Error::last_os_error();
            if done > 0 {
                // Part of the run is placed: go on after it (whatever
                // stopped the kernel, EEXIST at the next page included,
                // is seen again by the next call).
                let done = (done as u64).min(end - at) & !(PAGE - 1);
                placed += done / PAGE;
                // (The kernel places whole pages: never less than one.)
                at += done.max(PAGE);
                continue;
            }
            match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => {}
                Some(libc::EEXIST) => at += PAGE,
                _ => return Err(e),
            }
        }
        Ok(placed)
    }

    /// `UFFDIO_UNREGISTER` of `[start, start + len)`; wakes threads blocked
    /// on faults there.
    pub fn unregister(&self, start: u64, len: u64) -> io::Result<()> {
        let arg = UffdioRange { start, len };
        // SAFETY: UFFDIO_UNREGISTER reads one `uffdio_range` (`arg`).
        check(unsafe { ioctl_with_ref(self, nr::UFFDIO_UNREGISTER(), &arg) })?;
        Ok(())
    }

    /// `UFFDIO_WRITEPROTECT`: protects (`protect`) or unprotects
    /// `[start, start + len)`. Unprotecting wakes the threads that faulted
    /// there when `wake` is set.
    pub fn write_protect(&self, start: u64, len: u64, protect: bool, wake: bool) -> io::Result<()> {
        let mode = if protect {
            UFFDIO_WRITEPROTECT_MODE_WP
        } else if wake {
            0
        } else {
            UFFDIO_WRITEPROTECT_MODE_DONTWAKE
        };
        let mut arg = UffdioWriteprotect {
            range: UffdioRange { start, len },
            mode,
        };
        // SAFETY: UFFDIO_WRITEPROTECT reads and writes one
        // `uffdio_writeprotect` (`arg`); it changes page protection in a
        // range this fd registered, never the memory's contents.
        check(unsafe { ioctl_with_mut_ref(self, nr::UFFDIO_WRITEPROTECT(), &mut arg) })?;
        Ok(())
    }

    /// `UFFDIO_WAKE`: wakes threads blocked on faults in the range.
    pub fn wake(&self, start: u64, len: u64) -> io::Result<()> {
        let arg = UffdioRange { start, len };
        // SAFETY: UFFDIO_WAKE reads one `uffdio_range` (`arg`).
        check(unsafe { ioctl_with_ref(self, nr::UFFDIO_WAKE(), &arg) })?;
        Ok(())
    }

    /// Waits up to `timeout_ms` for events, or until `wake` (an eventfd,
    /// say) becomes readable; true if events may be readable.
    pub fn poll(&self, wake: Option<BorrowedFd<'_>>, timeout_ms: i32) -> io::Result<bool> {
        let entry = |fd: libc::c_int| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let mut pfds = [entry(self.as_raw_fd()), entry(-1)];
        let mut nfds = 1;
        if let Some(w) = wake {
            pfds[1] = entry(w.as_raw_fd());
            nfds = 2;
        }
        // SAFETY: `pfds` holds at least `nfds` valid `pollfd`s.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), nfds, timeout_ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            };
        }
        Ok(pfds[0].revents & libc::POLLIN != 0)
    }

    /// Reads pending events into `buf`; returns how many. `Ok(0)` when none
    /// is pending (EAGAIN: a spurious wake-up).
    pub fn read_msgs(&self, buf: &mut [UffdMsg]) -> io::Result<usize> {
        let bytes = std::mem::size_of_val(buf);
        // SAFETY: `buf` is writable for `bytes` bytes and `UffdMsg` is plain
        // data, valid for any bit pattern the kernel writes.
        let n = unsafe { libc::read(self.as_raw_fd(), buf.as_mut_ptr().cast(), bytes) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
                _ => Err(e),
            };
        }
        Ok(n as usize / std::mem::size_of::<UffdMsg>())
    }
}

/// Drops the pages of `[addr, addr + len)` (`MADV_DONTNEED`): private
/// anonymous memory reads as never touched afterwards, so a range
/// registered for missing faults faults there again (postcopy: pages the
/// source says are stale). `addr` and `len` must be page-aligned and the
/// range must be memory this process mapped for guest RAM.
pub fn drop_pages(addr: u64, len: u64) -> io::Result<()> {
    // SAFETY: madvise(MADV_DONTNEED) changes no mapping and writes no
    // memory the program holds references into; it only releases the
    // pages of a guest-memory range, which later read as zeros or fault.
    check(unsafe { libc::madvise(addr as *mut libc::c_void, len as usize, libc::MADV_DONTNEED) })?;
    Ok(())
}

/// Frees the pages of a shared file mapping's range in the file itself
/// (`MADV_REMOVE`: a hole is punched in the memfd), so that the next touch
/// finds no page there: a missing-page fault under userfaultfd, zeros
/// otherwise. `MADV_DONTNEED` would only unmap them and the next touch
/// would map the file's old pages again.
pub fn remove_pages(addr: u64, len: u64) -> io::Result<()> {
    // SAFETY: madvise(MADV_REMOVE) changes no mapping and writes no memory
    // the program holds references into; it frees the file pages behind a
    // guest-memory range, which later read as zeros or fault.
    check(unsafe { libc::madvise(addr as *mut libc::c_void, len as usize, libc::MADV_REMOVE) })?;
    Ok(())
}

/// Empties `[addr, addr + len)` of guest memory so that the next touch
/// finds no page there: [`remove_pages`] for file-backed (memfd) memory,
/// whose pages live in the file and would map again without a fault,
/// [`drop_pages`] for private anonymous memory.
pub fn empty_pages(file_backed: bool, addr: u64, len: u64) -> io::Result<()> {
    if file_backed {
        remove_pages(addr, len)
    } else {
        drop_pages(addr, len)
    }
}

/// An eventfd that interrupts a thread waiting in [`Uffd::poll`].
#[derive(Debug)]
pub struct Waker {
    fd: OwnedFd,
}

impl AsFd for Waker {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Waker {
    /// A non-blocking, close-on-exec eventfd.
    pub fn new() -> io::Result<Self> {
        // SAFETY: eventfd(2) takes an initial count and flags and returns a
        // new fd or -1; no memory is passed.
        let raw = check(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
        // SAFETY: the call just returned this fd and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(Waker { fd })
    }

    /// Makes the eventfd readable until [`Waker::drain`].
    pub fn wake(&self) -> io::Result<()> {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes the 8 bytes of `one`, the size an eventfd takes.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Resets the eventfd (nothing to read any more).
    pub fn drain(&self) {
        let mut buf = [0u8; 8];
        // SAFETY: reads at most 8 bytes into `buf`; EAGAIN (already empty)
        // is fine.
        unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    }
}

/// What one [`Pagemap::scan`] call covers and selects.
#[derive(Clone, Copy, Debug, Default)]
pub struct ScanRequest {
    /// `PM_SCAN_*` flags.
    pub flags: u64,
    /// First byte address (page aligned).
    pub start: u64,
    /// End byte address (exclusive).
    pub end: u64,
    /// Report only pages having all these categories.
    pub category_mask: u64,
    /// Report only pages having at least one of these categories (0: no
    /// such condition).
    pub category_anyof_mask: u64,
    /// Categories copied into each [`PageRegion::categories`].
    pub return_mask: u64,
}

/// `/proc/self/pagemap`, for the `PAGEMAP_SCAN` ioctl (Linux 6.7+).
#[derive(Debug)]
pub struct Pagemap {
    file: File,
}

impl Pagemap {
    /// Opens this process's pagemap.
    pub fn open() -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC)
            .open("/proc/self/pagemap")?;
        Ok(Pagemap { file })
    }

    /// Checks that this kernel offers `PAGEMAP_SCAN` by scanning one page
    /// of a private buffer (read only: no flags).
    pub fn probe(&self) -> io::Result<()> {
        let buf = vec![0u8; 2 * 4096];
        let start = (buf.as_ptr() as u64 + 4095) & !4095;
        let req = ScanRequest {
            start,
            end: start + 4096,
            return_mask: PAGE_IS_PRESENT,
            ..Default::default()
        };
        let mut out = Vec::with_capacity(1);
        self.scan(&req, &mut out).map(drop)
    }

    /// `PAGEMAP_SCAN` of `req`: fills `out` (cleared first, up to its
    /// capacity, at least one) with matching regions and returns the
    /// address where the walk stopped: `req.end` when it covered the whole
    /// range, earlier when `out` filled up (continue from there).
    pub fn scan(&self, req: &ScanRequest, out: &mut Vec<PageRegion>) -> io::Result<u64> {
        out.clear();
        if out.capacity() == 0 {
            out.reserve(1);
        }
        let cap = out.capacity();
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            flags: req.flags,
            start: req.start,
            end: req.end,
            walk_end: 0,
            vec: out.as_mut_ptr() as u64,
            vec_len: cap as u64,
            max_pages: 0,
            category_inverted: 0,
            category_mask: req.category_mask,
            category_anyof_mask: req.category_anyof_mask,
            return_mask: req.return_mask,
        };
        // SAFETY: PAGEMAP_SCAN reads and writes one `pm_scan_arg` (`arg`)
        // and writes at most `vec_len` `page_region`s to `vec`, which points
        // at `cap` writable, properly aligned elements of `out`. With
        // WP_MATCHING it write-protects pages of this process, which changes
        // no contents.
        let n = check(unsafe { ioctl_with_mut_ref(&self.file, nr::PAGEMAP_SCAN(), &mut arg) })?
            as usize;
        if n > cap {
            return Err(io::Error::other(format!(
                "PAGEMAP_SCAN reported {n} regions for {cap} slots"
            )));
        }
        // SAFETY: the kernel initialised the first `n` elements (its return
        // value, checked against the capacity); `PageRegion` is plain data.
        unsafe { out.set_len(n) };
        Ok(arg.walk_end)
    }
}

/// Runs `ioctl` (a call returning a C result, errno on failure) until it
/// succeeds or fails with another errno than `EAGAIN` or `EINTR`.
fn retrying(mut ioctl: impl FnMut() -> libc::c_int) -> io::Result<()> {
    loop {
        if ioctl() >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINTR) => continue,
            _ => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_numbers_match_the_kernel() {
        // Values as the C headers compute them on x86_64/aarch64.
        assert_eq!(nr::USERFAULTFD_IOC_NEW(), 0xAA00);
        assert_eq!(nr::UFFDIO_API(), 0xc018_aa3f);
        assert_eq!(nr::UFFDIO_REGISTER(), 0xc020_aa00);
        assert_eq!(nr::UFFDIO_UNREGISTER(), 0x8010_aa01);
        assert_eq!(nr::UFFDIO_WRITEPROTECT(), 0xc018_aa06);
        assert_eq!(nr::PAGEMAP_SCAN(), 0xc060_6610);
    }

    #[test]
    fn a_run_is_placed_around_the_pages_already_there() {
        let Ok(u) = Uffd::open() else {
            eprintln!("skipped: no userfaultfd");
            return;
        };
        if u.api(0).is_err() {
            eprintln!("skipped: userfaultfd API refused");
            return;
        }
        const P: usize = 4096;
        let m = crate::sys::mmap::AnonMapping::new(8 * P).unwrap();
        let base = m.as_ptr() as u64;
        if u.register_missing(base, 8 * P as u64).is_err() {
            eprintln!("skipped: missing-mode registration refused");
            return;
        }
        // Pages 1 and 3 are there before the run (another thread's).
        u.copy(base + P as u64, &[0xaa; P]).unwrap();
        u.zeropage(base + 3 * P as u64, P as u64).unwrap();
        let src: Vec<u8> = (0..5 * P).map(|i| (i / P) as u8 + 1).collect();
        // Pages 0..5: 0, 2 and 4 are placed, 1 and 3 kept.
        assert_eq!(u.copy_run(base, &src).unwrap(), 3);
        // Pages 5..8 zeros, 5 was placed just now by a racer.
        u.copy(base + 5 * P as u64, &[0x55; P]).unwrap();
        assert_eq!(u.zero_run(base + 5 * P as u64, 3 * P as u64).unwrap(), 2);
        // Every page is there now: reading cannot fault.
        let mut all = vec![0u8; 8 * P];
        // SAFETY: the mapping is 8 pages long, every one of them placed.
        unsafe { std::ptr::copy_nonoverlapping(m.as_ptr(), all.as_mut_ptr(), 8 * P) };
        let first: Vec<u8> = (0..8).map(|k| all[k * P]).collect();
        assert_eq!(first, [1, 0xaa, 3, 0, 5, 0x55, 0, 0]);
        assert!(all[2 * P..3 * P].iter().all(|&b| b == 3));
        u.unregister(base, 8 * P as u64).unwrap();
        // Nothing is left to place.
        assert!(u.copy_run(base, &src).is_err());
    }

    #[test]
    fn pagemap_scan_reports_present_pages() {
        let Ok(pm) = Pagemap::open() else {
            eprintln!("skipped: /proc/self/pagemap cannot be opened");
            return;
        };
        let page = vec![1u8; 3 * 4096];
        let start = (page.as_ptr() as u64 + 4095) & !4095;
        let req = ScanRequest {
            start,
            end: start + 4096,
            category_mask: PAGE_IS_PRESENT,
            return_mask: PAGE_IS_PRESENT,
            ..Default::default()
        };
        let mut out = Vec::with_capacity(4);
        match pm.scan(&req, &mut out) {
            Ok(end) => {
                assert_eq!(end, start + 4096);
                assert_eq!(out.len(), 1);
                assert_eq!(out[0].start, start);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOTTY) => {
                eprintln!("skipped: no PAGEMAP_SCAN on this kernel")
            }
            Err(e) => panic!("PAGEMAP_SCAN: {e}"),
        }
    }
}
