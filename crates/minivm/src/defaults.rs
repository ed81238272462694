//! Defaults the `minivm` and `livemig` commands share, so that the same
//! setting starts the same VM whichever command is given it.

/// Guest memory (`--mem`).
pub const MEM: &str = "1G";
/// vCPUs (`--vcpus`).
pub const VCPUS: u16 = 2;
/// Bytes per second the test guest writes, all vCPUs together
/// (`--dirty-rate`).
pub const DIRTY_RATE: &str = "512M";
/// Dirty-ring entries per vCPU when the ring tracker is chosen
/// (`--dirty-ring`).
pub const DIRTY_RING: u32 = 16384;

/// Pages each vCPU of the test guest writes when `--working-set` is not
/// given: about 3/4 of the memory above the guest's code, shared by the
/// vCPUs, at most 384 MiB each.
pub fn working_set_pages(mem: u64, vcpus: usize) -> u64 {
    let usable = mem.saturating_sub(4 << 20);
    (usable * 3 / 4 / vcpus.max(1) as u64 / 4096).clamp(1, 384 << 8)
}

#[cfg(test)]
mod tests {
    #[test]
    fn working_set_shares_three_quarters_up_to_a_cap() {
        use super::working_set_pages;
        // 1 GiB, 2 vCPUs: (1024 - 4) MiB * 3/4 / 2 = 382.5 MiB each.
        assert_eq!(
            working_set_pages(1 << 30, 2),
            (1020 << 20) * 3 / 4 / 2 / 4096
        );
        // Large guests are capped at 384 MiB per vCPU.
        assert_eq!(working_set_pages(64 << 30, 1), 384 << 8);
        // Tiny guests still write one page.
        assert_eq!(working_set_pages(2 << 20, 1), 1);
    }
}
