//! One bit per guest page: the migration bitmap and the logs trackers fill.

/// A fixed-size bitmap with one bit per page, counting its set bits.
///
/// Bit `i` set means page `i` of a RAM block must be (re)sent. The count of
/// set bits is kept up to date so "remaining pages" costs nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    bits: u64,
    set: u64,
}

impl DirtyBitmap {
    /// A bitmap of `bits` bits, all clear.
    pub fn new(bits: u64) -> Self {
        let nwords = bits.div_ceil(64) as usize;
        DirtyBitmap {
            words: vec![0; nwords],
            bits,
            set: 0,
        }
    }

    /// A bitmap of `bits` bits, all set.
    pub fn new_full(bits: u64) -> Self {
        let mut b = Self::new(bits);
        b.set_all();
        b
    }

    /// Number of bits (pages) covered.
    pub fn len(&self) -> u64 {
        self.bits
    }

    /// True when the bitmap covers no page at all.
    pub fn is_empty(&self) -> bool {
        self.bits == 0
    }

    /// Number of bits currently set.
    pub fn count(&self) -> u64 {
        self.set
    }

    /// The backing words, bit `i` in word `i / 64`, bit `i % 64`.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Sets every bit.
    pub fn set_all(&mut self) {
        for w in &mut self.words {
            *w = u64::MAX;
        }
        self.trim_tail();
        self.set = self.bits;
    }

    /// Clears every bit.
    pub fn clear_all(&mut self) {
        for w in &mut self.words {
            *w = 0;
        }
        self.set = 0;
    }

    fn trim_tail(&mut self) {
        let rem = self.bits % 64;
        if rem != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << rem) - 1;
            }
        }
    }

    /// Tests bit `i`; bits past the end read as clear.
    pub fn test(&self, i: u64) -> bool {
        i < self.bits && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Sets bit `i`; returns true if it was clear. Bits past the end are ignored.
    pub fn set(&mut self, i: u64) -> bool {
        if i >= self.bits {
            return false;
        }
        let w = &mut self.words[(i / 64) as usize];
        let m = 1u64 << (i % 64);
        let was_clear = *w & m == 0;
        *w |= m;
        self.set += was_clear as u64;
        was_clear
    }

    /// Clears bit `i`; returns true if it was set.
    pub fn clear(&mut self, i: u64) -> bool {
        if i >= self.bits {
            return false;
        }
        let w = &mut self.words[(i / 64) as usize];
        let m = 1u64 << (i % 64);
        let was_set = *w & m != 0;
        *w &= !m;
        self.set -= was_set as u64;
        was_set
    }

    /// Sets bits `[first, first + count)`; returns how many were clear before.
    pub fn set_range(&mut self, first: u64, count: u64) -> u64 {
        let end = first.saturating_add(count).min(self.bits);
        let mut newly = 0;
        let mut i = first;
        while i < end {
            let wi = (i / 64) as usize;
            let lo = i % 64;
            let hi = (end - (i - lo)).min(64);
            let mask = if hi == 64 { u64::MAX } else { (1u64 << hi) - 1 } & (u64::MAX << lo);
            let w = &mut self.words[wi];
            newly += u64::from((mask & !*w).count_ones());
            *w |= mask;
            i = i - lo + hi;
        }
        self.set += newly;
        newly
    }

    /// ORs `src` into the words starting at word index `word_offset`.
    /// Returns how many bits became set. Bits past the end are dropped.
    pub fn or_words(&mut self, word_offset: usize, src: &[u64]) -> u64 {
        let last = self.words.len().saturating_sub(1);
        let tail_mask = match self.bits % 64 {
            0 => u64::MAX,
            r => (1u64 << r) - 1,
        };
        let mut newly = 0u64;
        for (k, &s) in src.iter().enumerate() {
            let wi = word_offset + k;
            let Some(w) = self.words.get_mut(wi) else {
                break;
            };
            let s = if wi == last { s & tail_mask } else { s };
            newly += u64::from((s & !*w).count_ones());
            *w |= s;
        }
        self.set += newly;
        newly
    }

    /// Clears, in the words starting at word index `word_offset`, the bits
    /// set in `mask`. Returns how many were set. Words past the end are
    /// ignored.
    pub fn and_not_words(&mut self, word_offset: usize, mask: &[u64]) -> u64 {
        let mut cleared = 0u64;
        for (k, &m) in mask.iter().enumerate() {
            let Some(w) = self.words.get_mut(word_offset + k) else {
                break;
            };
            cleared += u64::from((*w & m).count_ones());
            *w &= !m;
        }
        self.set -= cleared;
        cleared
    }

    /// The first set bit at or after `from`, if any.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        self.first_from(from, |wi| self.words[wi])
    }

    /// The first clear bit at or after `from`, if any.
    pub fn next_clear(&self, from: u64) -> Option<u64> {
        self.first_from(from, |wi| !self.words[wi])
    }

    /// The first bit at or after `from` that is set here and clear in
    /// `except` (bits past `except`'s end count as clear there).
    pub fn next_set_except(&self, from: u64, except: &DirtyBitmap) -> Option<u64> {
        let other = |wi: usize| except.words.get(wi).copied().unwrap_or(0);
        self.first_from(from, |wi| self.words[wi] & !other(wi))
    }

    /// The first bit at or after `from` set in `word(i)`, the bitmap's
    /// i-th word as the caller sees it.
    fn first_from(&self, from: u64, word: impl Fn(usize) -> u64) -> Option<u64> {
        if from >= self.bits {
            return None;
        }
        let mut wi = (from / 64) as usize;
        let mut w = word(wi) & (u64::MAX << (from % 64));
        loop {
            if w != 0 {
                let i = wi as u64 * 64 + u64::from(w.trailing_zeros());
                return (i < self.bits).then_some(i);
            }
            wi += 1;
            if wi >= self.words.len() {
                return None;
            }
            w = word(wi);
        }
    }

    /// Makes this bitmap `a AND b` (all three the same length; shorter
    /// inputs read as clear past their end).
    pub fn assign_and(&mut self, a: &DirtyBitmap, b: &DirtyBitmap) {
        let mut set = 0u64;
        for (i, w) in self.words.iter_mut().enumerate() {
            let x = a.words.get(i).copied().unwrap_or(0) & b.words.get(i).copied().unwrap_or(0);
            *w = x;
            set += u64::from(x.count_ones());
        }
        self.set = set;
        let before = self.words.last().copied().unwrap_or(0);
        self.trim_tail();
        let after = self.words.last().copied().unwrap_or(0);
        self.set -= u64::from((before & !after).count_ones());
    }

    /// Copies `src`'s bits (same length) into this bitmap.
    pub fn copy_from(&mut self, src: &DirtyBitmap) {
        self.words.clear();
        self.words.extend_from_slice(&src.words);
        self.bits = src.bits;
        self.set = src.set;
    }

    /// Clears the run of set bits that starts at `from`, at most `max` of
    /// them, a word at a time; returns how many it cleared (0 when bit
    /// `from` is clear or past the end).
    pub fn take_run(&mut self, from: u64, max: u64) -> u64 {
        let end = from.saturating_add(max).min(self.bits);
        let mut i = from;
        while i < end {
            let wi = (i / 64) as usize;
            let lo = i % 64;
            // Set bits from `lo` up, then the first clear one stops the run.
            let ones = (self.words[wi] >> lo).trailing_ones() as u64;
            let take = ones.min(64 - lo).min(end - i);
            if take == 0 {
                break;
            }
            let mask = if take == 64 {
                u64::MAX
            } else {
                ((1u64 << take) - 1) << lo
            };
            self.words[wi] &= !mask;
            i += take;
            if lo + take < 64 {
                break;
            }
        }
        let n = i - from.min(i);
        self.set -= n;
        n
    }

    /// True if any bit in `[first, first + count)` is set.
    pub fn any_in(&self, first: u64, count: u64) -> bool {
        match self.next_set(first) {
            Some(i) => i < first.saturating_add(count),
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn and_not_words_clears_masked_bits_and_counts_them() {
        let mut b = DirtyBitmap::new(130);
        b.set_range(60, 70);
        assert_eq!(b.and_not_words(1, &[0b1011, u64::MAX, 7]), 3 + 2);
        assert!(b.test(63) && !b.test(64) && b.test(66) && !b.test(128));
        assert_eq!(b.count(), 65);
        assert_eq!(b.and_not_words(5, &[u64::MAX]), 0, "past the end");
    }

    #[test]
    fn next_clear_finds_the_end_of_a_run() {
        let mut b = DirtyBitmap::new(130);
        b.set_range(60, 10);
        assert_eq!(b.next_clear(0), Some(0));
        assert_eq!(b.next_clear(60), Some(70), "across a word boundary");
        assert_eq!(b.next_clear(129), Some(129));
        assert_eq!(b.next_clear(130), None);
        // A full bitmap has none, not even in the last word's spare bits.
        assert_eq!(DirtyBitmap::new_full(130).next_clear(0), None);
    }

    #[test]
    fn take_run_clears_consecutive_set_bits_only() {
        let mut b = DirtyBitmap::new(300);
        b.set_range(3, 200);
        b.clear(150);
        // Stops at the clear bit 150, across word boundaries.
        assert_eq!(b.take_run(3, u64::MAX), 147);
        assert_eq!(b.count(), 52);
        assert!(!b.test(3) && !b.test(149) && b.test(151));
        // Bit 150 is clear: nothing to take.
        assert_eq!(b.take_run(150, 10), 0);
        // At most `max`.
        assert_eq!(b.take_run(151, 10), 10);
        assert!(!b.test(160) && b.test(161));
        // Up to the end of the set range (bit 203 is clear).
        assert_eq!(b.take_run(161, 1000), 42);
        assert_eq!(b.count(), 0);
        // A full bitmap whose length is not a word multiple: to its end.
        let mut f = DirtyBitmap::new_full(130);
        assert_eq!(f.take_run(0, u64::MAX), 130);
        assert_eq!(f.count(), 0);
        assert_eq!(f.take_run(130, 5), 0, "past the end");
        let mut g = DirtyBitmap::new_full(128);
        assert_eq!(g.take_run(64, 64), 64);
        assert_eq!(g.take_run(0, 0), 0);
        assert_eq!(g.count(), 64);
    }

    #[test]
    fn set_clear_count() {
        let mut b = DirtyBitmap::new(130);
        assert!(b.set(0));
        assert!(!b.set(0));
        assert!(b.set(129));
        assert!(!b.set(130), "past the end is ignored");
        assert_eq!(b.count(), 2);
        assert!(b.test(129));
        assert!(b.clear(0));
        assert!(!b.clear(0));
        assert_eq!(b.count(), 1);
    }

    #[test]
    fn next_set_except_skips_excluded_bits() {
        let mut a = DirtyBitmap::new(200);
        let mut ex = DirtyBitmap::new(200);
        for i in [3, 64, 65, 130, 199] {
            a.set(i);
        }
        ex.set(3);
        ex.set(64);
        ex.set(199);
        assert_eq!(a.next_set_except(0, &ex), Some(65));
        assert_eq!(a.next_set_except(66, &ex), Some(130));
        assert_eq!(a.next_set_except(131, &ex), None);
        assert_eq!(a.next_set_except(200, &ex), None);
        // A shorter exclusion reads as clear past its end.
        assert_eq!(a.next_set_except(131, &DirtyBitmap::new(10)), Some(199));
    }

    #[test]
    fn assign_and_and_copy_keep_the_count() {
        let mut a = DirtyBitmap::new_full(70);
        let mut b = DirtyBitmap::new(70);
        b.set(1);
        b.set(69);
        a.clear(1);
        let mut c = DirtyBitmap::new(70);
        c.assign_and(&a, &b);
        assert_eq!(c.count(), 1);
        assert!(c.test(69) && !c.test(1));
        let mut d = DirtyBitmap::new(70);
        d.copy_from(&b);
        assert_eq!(d, b);
    }

    #[test]
    fn full_trims_tail() {
        let b = DirtyBitmap::new_full(70);
        assert_eq!(b.count(), 70);
        assert_eq!(b.words()[1], (1 << 6) - 1);
        assert_eq!(b.next_set(69), Some(69));
        assert_eq!(b.next_set(70), None);
    }

    #[test]
    fn next_set_scans_words() {
        let mut b = DirtyBitmap::new(1000);
        b.set(3);
        b.set(700);
        assert_eq!(b.next_set(0), Some(3));
        assert_eq!(b.next_set(4), Some(700));
        assert_eq!(b.next_set(701), None);
        assert!(b.any_in(600, 101));
        assert!(!b.any_in(600, 100));
    }

    #[test]
    fn set_range_counts_newly_set() {
        let mut b = DirtyBitmap::new(200);
        b.set(10);
        b.set(100);
        assert_eq!(b.set_range(5, 150), 148);
        assert_eq!(b.count(), 150);
        assert_eq!(b.set_range(190, 100), 10, "clipped at the end");
        assert_eq!(b.count(), 160);
    }

    #[test]
    fn or_words_counts_and_clips() {
        let mut b = DirtyBitmap::new(100);
        b.set(0);
        assert_eq!(b.or_words(0, &[0b11, u64::MAX, u64::MAX]), 1 + 36);
        assert_eq!(b.count(), 38);
        assert!(!b.test(100));
    }
}
