//! What the engine needs from the VMM that runs the guest, beyond memory.

/// Any error of the VMM's own, kept as the cause of a [`VmError`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why the VMM could not do what the engine asked of it. The VMM's own
/// error is kept as the cause ([`std::error::Error::source`]).
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The vCPUs could not be stopped.
    #[error("pausing the guest failed: {0}")]
    Pause(#[source] BoxError),
    /// The vCPUs could not be started again.
    #[error("resuming the guest failed: {0}")]
    Resume(#[source] BoxError),
    /// Device or vCPU state could not be saved.
    #[error("saving the guest's device and vCPU state failed: {0}")]
    SaveState(#[source] BoxError),
    /// Device or vCPU state could not be restored.
    #[error("restoring the guest's device and vCPU state failed: {0}")]
    RestoreState(#[source] BoxError),
}

impl VmError {
    /// Wraps a VMM error (anything that converts to [`BoxError`], a
    /// `String` included) as a failed pause.
    pub fn pause(e: impl Into<BoxError>) -> Self {
        VmError::Pause(e.into())
    }

    /// Wraps a VMM error as a failed resume.
    pub fn resume(e: impl Into<BoxError>) -> Self {
        VmError::Resume(e.into())
    }

    /// Wraps a VMM error as a failed state save.
    pub fn save_state(e: impl Into<BoxError>) -> Self {
        VmError::SaveState(e.into())
    }

    /// Wraps a VMM error as a failed state restore.
    pub fn restore_state(e: impl Into<BoxError>) -> Self {
        VmError::RestoreState(e.into())
    }
}

/// What saving the VMM's device and vCPU state is expected to cost, so the
/// switch-over decision can count it in the pause (see
/// [`VmControl::state_cost`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StateCost {
    /// Bytes [`VmControl::save_state`] returns (about).
    pub bytes: u64,
    /// How long [`VmControl::save_state`] takes (about).
    pub save_time: std::time::Duration,
}

/// What a VM looks like beyond its memory (which the block list
/// describes): sent by the source at setup, checked by the destination
/// before any page (see [`VmControl::shape`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmShape {
    /// vCPU count; 0 when the VMM does not say (then never checked).
    pub vcpus: u32,
}

/// What the source said of its guest at setup (the SETUP record), before
/// any page: given to the destination VMM's [`SetupHook`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceGuest {
    /// vCPU count; 0 when the source's VMM did not say.
    pub vcpus: u32,
    /// How busy its vCPUs were as the migration started, in hundredths of
    /// a vCPU (0: all halted; see [`VmControl::vcpu_load`]); `None` when
    /// the source's VMM did not say.
    pub load: Option<u32>,
}

/// Called by the destination's load once the source's setup record
/// arrived and checked out, before any page is written (the source sends
/// none until the destination's verdict): the VMM may prepare its memory
/// for the receive by what the source said (see
/// [`VmControl::setup_hook`]). Runs on the load's thread, so it holds
/// what it needs itself rather than borrowing the VMM.
pub type SetupHook = Box<dyn Fn(&SourceGuest) + Send + Sync>;

/// Control of the guest: on the migration source (pause, state, resume
/// after a failure) and on the destination (restore the state, resume
/// after the source's GO: see [`crate::engine::Destination`]).
///
/// Errors are the VMM's own, wrapped in a [`VmError`] that says which
/// operation failed.
pub trait VmControl: Send {
    /// Stops the vCPUs: stop-and-copy begins. Must return only once no
    /// vCPU can write guest memory any more.
    fn pause(&mut self) -> Result<(), VmError>;

    /// Lets the vCPUs run again (after a cancel or failed completion).
    fn resume(&mut self) -> Result<(), VmError>;

    /// Throttles the vCPUs: each sleeps `percent`% of every time slice
    /// (0 = no throttling). Called by auto-converge.
    fn set_throttle(&mut self, percent: u8) {
        let _ = percent;
    }

    /// Device and vCPU state, taken with the VM paused, sent after the RAM.
    /// An empty vector when the VMM has none.
    fn save_state(&mut self) -> Result<Vec<u8>, VmError> {
        Ok(Vec::new())
    }

    /// What [`VmControl::save_state`] will cost, asked while the guest
    /// runs: the engine counts it in the pause before it decides to
    /// switch over. The default, nothing, suits a VMM whose state is a few
    /// KiB; a VMM with large or slow state should say so, or the downtime
    /// limit may be overshot (the stats then say by how much). After one
    /// save the engine also counts what it measured.
    fn state_cost(&self) -> StateCost {
        StateCost::default()
    }

    /// How long [`VmControl::pause`] will take, asked while the guest
    /// runs (each step): the engine counts it in the pause before it
    /// decides to switch over. A VMM whose vCPUs are threads in and out
    /// of the hypervisor should measure it as it goes (minivm kicks its
    /// vCPUs out of the guest now and then and reports the slowest recent
    /// round trip) and say so. The default, nothing, suits a guest with no
    /// vCPUs to stop; the engine also counts the longest pause it saw in
    /// this migration.
    fn stop_cost(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }

    /// The VM's shape. The source sends it at setup; a destination whose
    /// own shape differs (another vCPU count) refuses the migration
    /// before any page is sent, and the source's error names why. The
    /// default says nothing (vCPUs 0): not checked.
    fn shape(&self) -> VmShape {
        VmShape::default()
    }

    /// On the source, as the migration starts: how busy the guest's
    /// vCPUs are, in hundredths of a vCPU (0: every vCPU halted, 100 per
    /// vCPU running flat out). Sent at setup for the destination's VMM
    /// ([`SourceGuest::load`]), which may pick how it receives by it. The
    /// default, `None`, says nothing.
    fn vcpu_load(&self) -> Option<u32> {
        None
    }

    /// On the destination, as a load begins: what to call with the
    /// source's setup ([`SourceGuest`]) before any page lands. The
    /// default, `None`, ignores it.
    fn setup_hook(&self) -> Option<SetupHook> {
        None
    }

    /// On the destination: loads the device and vCPU state the source's
    /// [`VmControl::save_state`] sent, with the guest paused, before the
    /// destination answers LOADED (so a state that does not fit leaves
    /// the guest to the source). The default accepts no state (memory
    /// only) and refuses a stream that carries some.
    fn restore_state(&mut self, state: &[u8]) -> Result<(), VmError> {
        if state.is_empty() {
            Ok(())
        } else {
            Err(VmError::restore_state(format!(
                "the stream carries {} bytes of device and vCPU state, but this destination \
                 holds memory only (it was sent by a VM: receive it into one)",
                state.len()
            )))
        }
    }
}

/// A guest with no vCPUs to stop (memory only): pausing does nothing.
#[derive(Debug, Default)]
pub struct NoVm;

impl VmControl for NoVm {
    fn pause(&mut self) -> Result<(), VmError> {
        Ok(())
    }
    fn resume(&mut self) -> Result<(), VmError> {
        Ok(())
    }
}
