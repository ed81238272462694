//! The pause's hot threads at a raised priority.
//!
//! On a host whose cores are shared, the threads the paused guest waits
//! for (the source's sending thread from the vCPU stop to STARTED, the
//! destination's receiving thread from the drain before the pause to
//! its resume) lose the CPU to every other runnable thread of equal
//! weight, and each wake-up waits its turn. For that stretch they run at
//! nice [`PAUSE_NICE`], and at their old value again after it. A raise
//! the host refuses (no `CAP_SYS_NICE`) changes nothing and never fails
//! the migration. `LIVEMIG_PAUSE_PRIORITY=0` in the environment turns it
//! off (to measure what it does).

use std::cell::RefCell;

use crate::sys::sched::{set_thread_nice, thread_nice};

/// Nice value of a hot thread of the pause (a VMM raising its vCPU
/// threads while a pause stops them uses the same).
pub const PAUSE_NICE: i32 = -10;

/// Whether the pause's threads may be raised: not turned off by
/// `LIVEMIG_PAUSE_PRIORITY=0` (read once).
pub fn pause_priority_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("LIVEMIG_PAUSE_PRIORITY").map_or(true, |v| v != "0"))
}

/// The calling thread at [`PAUSE_NICE`] until dropped (on the same
/// thread: it is neither `Send` nor `Sync`), then at its old value.
pub(crate) struct Raised {
    was: i32,
    _here: std::marker::PhantomData<*const ()>,
}

impl Raised {
    /// Raises the calling thread; `None` when it is off, already at
    /// least that high, or refused (logged).
    pub(crate) fn raise() -> Option<Raised> {
        if !pause_priority_enabled() {
            return None;
        }
        let was = thread_nice().ok()?;
        if was <= PAUSE_NICE {
            return None;
        }
        match set_thread_nice(PAUSE_NICE) {
            Ok(()) => Some(Raised {
                was,
                _here: std::marker::PhantomData,
            }),
            Err(e) => {
                log::debug!("the pause runs at normal priority: raising it was refused ({e})");
                None
            }
        }
    }
}

impl Drop for Raised {
    fn drop(&mut self) {
        if let Err(e) = set_thread_nice(self.was) {
            log::warn!("could not put this thread back to nice {} ({e})", self.was);
        }
    }
}

thread_local! {
    /// A raise that outlives the call that made it (the destination's:
    /// from a drain answer inside the load to the resume after it).
    static HELD: RefCell<Option<Raised>> = const { RefCell::new(None) };
}

/// Raises the calling thread until [`lower_this_thread`] (or the
/// thread's end); a second call while raised does nothing.
pub(crate) fn raise_this_thread() {
    HELD.with(|h| {
        let mut h = h.borrow_mut();
        if h.is_none() {
            *h = Raised::raise();
        }
    });
}

/// Ends [`raise_this_thread`]'s raise, if any.
pub(crate) fn lower_this_thread() {
    HELD.with(|h| h.borrow_mut().take());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_raise_ends_where_it_began() {
        std::thread::spawn(|| {
            let was = thread_nice().unwrap();
            {
                let r = Raised::raise();
                // Root may raise; elsewhere the refusal changes nothing.
                let now = thread_nice().unwrap();
                match r {
                    Some(_) => assert_eq!(now, PAUSE_NICE),
                    None => assert_eq!(now, was),
                }
            }
            assert_eq!(thread_nice().unwrap(), was, "put back on drop");
            raise_this_thread();
            raise_this_thread();
            let raised = thread_nice().unwrap();
            assert!(raised == PAUSE_NICE || raised == was, "{raised}");
            lower_this_thread();
            assert_eq!(thread_nice().unwrap(), was);
            lower_this_thread();
            assert_eq!(thread_nice().unwrap(), was, "nothing to lower twice");
        })
        .join()
        .unwrap();
    }
}
