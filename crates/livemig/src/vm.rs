//! What the engine needs from the VMM that runs the guest, beyond memory.

/// Control of the running guest on the migration source.
///
/// Errors are strings from the VMM, wrapped by the engine with context.
pub trait VmControl: Send {
    /// Stops the vCPUs: stop-and-copy begins. Must return only once no
    /// vCPU can write guest memory any more.
    fn pause(&mut self) -> Result<(), String>;

    /// Lets the vCPUs run again (after a cancel or failed completion).
    fn resume(&mut self) -> Result<(), String>;

    /// Throttles the vCPUs: each sleeps `percent`% of every time slice
    /// (0 = no throttling). Called by auto-converge.
    fn set_throttle(&mut self, percent: u8) {
        let _ = percent;
    }

    /// Device and vCPU state, taken with the VM paused, sent after the RAM.
    /// An empty vector when the VMM has none.
    fn save_state(&mut self) -> Result<Vec<u8>, String> {
        Ok(Vec::new())
    }
}

/// A guest with no vCPUs to stop (memory only): pausing does nothing.
#[derive(Debug, Default)]
pub struct NoVm;

impl VmControl for NoVm {
    fn pause(&mut self) -> Result<(), String> {
        Ok(())
    }
    fn resume(&mut self) -> Result<(), String> {
        Ok(())
    }
}
