//! Whole-VM migration: guest RAM through livemig's engine, then vCPU and
//! device state in the same stream. Snapshots use the same path with a
//! file transport.

use std::io::{Read, Write};

use livemig::dirty::DirtyError;
use livemig::engine::{
    write_ack, ChannelWriter, LoadError, LoadOutcome, Loader, MigrationError, MigrationHandle,
    MigrationStats, Source,
};

use crate::dirty::TrackerKind;
use crate::guest::GuestImage;
use crate::vm::{Vm, VmConfig, VmError};

/// Why a VM migration failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// Creating or restoring the VM failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The dirty tracker could not be set up.
    #[error(transparent)]
    Tracker(#[from] DirtyError),
    /// The outgoing migration failed (the source guest runs on).
    #[error(transparent)]
    Migration(#[from] MigrationError),
    /// The incoming stream failed to load (the destination guest never ran).
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The stream ended without vCPU state: not a VM migration.
    #[error("the stream carries no vCPU state: it was not sent by a VM source")]
    NoState,
}

/// Migrates `vm` out through `out`, tracking dirty pages with `kind`.
///
/// On success the source VM stays paused (the destination owns the guest
/// now); on failure or cancel it runs on.
pub fn migrate_out<W: Write>(
    vm: &Vm,
    kind: TrackerKind,
    handle: MigrationHandle,
    out: W,
    ack: Option<&mut dyn Read>,
) -> Result<MigrationStats, MigrateError> {
    let mem = vm.memory();
    let mut tracker = vm.tracker(kind)?;
    let mut control = vm.control();
    Ok(Source::new(&*mem, &mut *tracker, &mut control, handle).run(out, ack)?)
}

/// As [`migrate_out`], with `open(i)` opening the connection of page
/// channel `i` when the `channels` parameter is above 1 (see
/// [`Source::run_with_channels`]).
pub fn migrate_out_channels<W: Write>(
    vm: &Vm,
    kind: TrackerKind,
    handle: MigrationHandle,
    out: W,
    ack: Option<&mut dyn Read>,
    open: &mut dyn FnMut(u16) -> std::io::Result<ChannelWriter>,
) -> Result<MigrationStats, MigrateError> {
    let mem = vm.memory();
    let mut tracker = vm.tracker(kind)?;
    let mut control = vm.control();
    Ok(
        Source::new(&*mem, &mut *tracker, &mut control, handle)
            .run_with_channels(out, ack, open)?,
    )
}

/// Creates a paused VM from `config` (its guest image is ignored: memory
/// and state come from the stream), loads `input` into it and restores the
/// vCPU and device state. With `ack`, tells the source the outcome.
///
/// The VM is returned paused: [`Vm::resume`] starts the guest. A failed
/// load never runs the guest.
pub fn migrate_in<R: Read>(
    config: &VmConfig,
    input: R,
    ack: Option<&mut dyn Write>,
) -> Result<(Vm, LoadOutcome), MigrateError> {
    let config = VmConfig {
        guest: GuestImage::Incoming,
        start_paused: true,
        prefault: false,
        ..config.clone()
    };
    let vm = Vm::new(config)?;
    let loaded = load_into(&vm, input);
    if let Some(w) = ack {
        let msg = loaded.as_ref().map(|_| ()).map_err(|e| e.to_string());
        // If the source is gone its own error says why; nothing to add.
        let _ = write_ack(w, msg.as_ref().map(|_| ()).map_err(String::as_str));
    }
    let out = loaded?;
    Ok((vm, out))
}

fn load_into<R: Read>(vm: &Vm, input: R) -> Result<LoadOutcome, MigrateError> {
    let mem = vm.memory();
    let out = Loader::new(&*mem).load(input)?;
    if out.state.is_empty() {
        return Err(MigrateError::NoState);
    }
    vm.restore_state(&out.state)?;
    Ok(out)
}
