//! What the postcopy switch sends in the pause besides the device state:
//! the pages a sweeping vCPU touches first after it resumes, so that it
//! does not start by faulting.
//!
//! The final sync's harvest (`fresh`: the pages written since the sync
//! before) tells where the guest was working when it stopped. A long run
//! of consecutive pages written in the last interval is a **sweep**: a
//! vCPU walking memory in order (a copy, a memset, a scan that updates as
//! it goes, the harness's incrementer). It goes on just past the run's
//! end, where nothing may be valid on the destination yet (never sent, or
//! changed since), so its first touch after GO faults and waits for a
//! round trip. The pause carries the pages after the run's end that are
//! still to send, as long as they hold zeros, up to [`AHEAD_PAGES`]; the
//! background push starts at the first page it did not carry, so it keeps
//! ahead of the sweep instead of racing it from wherever precopy's scan
//! was.
//!
//! Zero pages only: a zero page costs a record header on the wire and
//! nothing on the destination (it knows its zeros and leaves them
//! untouched), whereas a page of data written before the switch may be
//! the first touch of a huge page there: 3.7-4.6 ms measured for one
//! 4 KiB page landing in untouched memory (the whole 2 MiB is allocated
//! and cleared), all of it added to the pause. After the switch the same
//! page is placed as a 4 KiB page by `UFFDIO_COPY`. The run's last page
//! is not carried either (it holds data; a writer stopped half-way
//! through it faults once).
//!
//! Measured on the harness's 1 GiB incrementer (one stream, `postcopy
//! auto`): the guest's first fault after GO was always the page right
//! after the final sync's run, and it waited 2.4-6.5 ms (behind the
//! megabytes the push had queued before flow control started).

use crate::bitmap::DirtyBitmap;

/// A run of at least this many pages written in the last interval is a
/// sweep.
pub(crate) const SWEEP_MIN_PAGES: u64 = 16;
/// Most sweeps followed (the longest ones: one per busy vCPU).
pub(crate) const MAX_SWEEPS: usize = 4;
/// Pages past a sweep's end looked at for the pause: what a vCPU sweeping
/// at ~250k pages/s crosses in ~2 ms, the time for the push to start.
pub(crate) const AHEAD_PAGES: u64 = 512;
/// Most stream bytes the pause carries for them (zero pages cost ~17
/// bytes each: only a bound).
pub(crate) const PAUSE_BYTES: u64 = 64 << 10;

/// The pages the pause may carry, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Per sweep, longest first: the pages after its end still to send
    /// (block, page), in address order.
    pub sweeps: Vec<Vec<(usize, u64)>>,
}

impl Plan {
    /// Plans the pause's pages from the final sync's harvest `fresh` and
    /// the pages still to send `missing` (both per block, same sizes).
    pub fn new(fresh: &[DirtyBitmap], missing: &[DirtyBitmap]) -> Plan {
        let mut sweeps: Vec<(u64, usize, u64)> = Vec::new(); // (len, block, end)
        for (b, (f, m)) in fresh.iter().zip(missing).enumerate() {
            if f.len() != m.len() {
                continue;
            }
            let mut p = 0;
            while let Some(first) = f.next_set(p) {
                let end = f.next_clear(first).unwrap_or(f.len());
                if end - first >= SWEEP_MIN_PAGES {
                    sweeps.push((end - first, b, end));
                }
                p = end;
            }
        }
        // Longest first; equal lengths in address order.
        sweeps.sort_by(|a, b| b.0.cmp(&a.0).then((a.1, a.2).cmp(&(b.1, b.2))));
        sweeps.truncate(MAX_SWEEPS);
        let sweeps = sweeps
            .into_iter()
            .map(|(_, b, end)| {
                let m = &missing[b];
                let stop = (end + AHEAD_PAGES).min(m.len());
                (end..stop).filter(|&q| m.test(q)).map(|q| (b, q)).collect()
            })
            .collect();
        Plan { sweeps }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bm(len: u64, runs: &[(u64, u64)]) -> DirtyBitmap {
        let mut b = DirtyBitmap::new(len);
        for &(a, e) in runs {
            for p in a..e {
                b.set(p);
            }
        }
        b
    }

    #[test]
    fn a_sweep_plans_the_pages_after_its_end() {
        // The incrementer: pages 1000..3000 written since the last sync;
        // everything from 500 on is still to send.
        let fresh = [bm(10_000, &[(1000, 3000)])];
        let missing = [bm(10_000, &[(500, 10_000)])];
        let p = Plan::new(&fresh, &missing);
        assert_eq!(p.sweeps.len(), 1);
        let s = &p.sweeps[0];
        assert_eq!(s.first(), Some(&(0, 3000)));
        assert_eq!(s.last(), Some(&(0, 3000 + AHEAD_PAGES - 1)));
        assert_eq!(s.len() as u64, AHEAD_PAGES);
    }

    #[test]
    fn pages_valid_on_the_destination_are_left_out() {
        // Precopy sent 3000..3100 after the writer passed: valid there.
        let fresh = [bm(10_000, &[(1000, 3000)])];
        let missing = [bm(10_000, &[(1000, 3000), (3100, 10_000)])];
        let s = &Plan::new(&fresh, &missing).sweeps[0];
        assert_eq!(s[0], (0, 3100));
        assert_eq!(s.len() as u64, AHEAD_PAGES - 100);
    }

    #[test]
    fn a_sweep_at_the_end_of_a_block_stops_there() {
        let fresh = [bm(4096, &[(4000, 4096)]), bm(4096, &[])];
        let missing = [bm(4096, &[(0, 4096)]), bm(4096, &[(0, 4096)])];
        let s = &Plan::new(&fresh, &missing).sweeps[0];
        assert!(s.is_empty(), "{s:?}");
    }

    #[test]
    fn the_longest_sweeps_come_first_and_at_most_max_sweeps() {
        let runs: Vec<(u64, u64)> = (0..6).map(|k| (k * 10_000, k * 10_000 + 100 + k)).collect();
        let fresh = [bm(100_000, &runs)];
        let missing = [bm(100_000, &[(0, 100_000)])];
        let p = Plan::new(&fresh, &missing);
        assert_eq!(p.sweeps.len(), MAX_SWEEPS);
        // Run k ends at k * 10_000 + 100 + k; the longest is k = 5.
        let ends: Vec<u64> = p.sweeps.iter().map(|s| s[0].1).collect();
        assert_eq!(ends, vec![50_105, 40_104, 30_103, 20_102]);
    }

    #[test]
    fn short_runs_are_not_sweeps() {
        // Scattered pages and runs of SWEEP_MIN_PAGES - 1: none followed.
        let mut runs: Vec<(u64, u64)> = (0..100).map(|k| (k * 10, k * 10 + 1)).collect();
        runs.push((1500, 1500 + SWEEP_MIN_PAGES - 1));
        let fresh = [bm(4000, &runs)];
        let missing = [bm(4000, &[(0, 4000)])];
        assert_eq!(Plan::new(&fresh, &missing), Plan::default());
        let fresh = [bm(4000, &[(1500, 1500 + SWEEP_MIN_PAGES)])];
        assert_eq!(Plan::new(&fresh, &missing).sweeps.len(), 1);
    }

    #[test]
    fn nothing_written_nothing_planned() {
        let fresh = [bm(1000, &[])];
        let missing = [bm(1000, &[(0, 1000)])];
        assert_eq!(Plan::new(&fresh, &missing), Plan::default());
        // No harvest at all (pure postcopy) or mismatched sizes.
        assert_eq!(Plan::new(&[], &missing), Plan::default());
        assert_eq!(Plan::new(&[bm(10, &[(0, 10)])], &missing), Plan::default());
    }
}
