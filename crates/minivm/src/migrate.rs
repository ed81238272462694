//! Whole-VM migration: guest RAM through livemig's engine, then vCPU and
//! device state in the same stream. Snapshots use the same path with a
//! file transport.

use std::io::{Read, Write};

use livemig::dirty::DirtyError;
use livemig::engine::{
    Arrival, ChannelWriter, Destination, DestinationError, MigrationError, MigrationHandle,
    MigrationStats, Source,
};
use livemig::transport::Incoming;

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
    /// The incoming migration failed: refused, failed to load, or the
    /// source never said GO (the destination guest never ran).
    #[error(transparent)]
    Incoming(#[from] DestinationError),
}

/// Migrates `vm` out through `out`, tracking dirty pages with `kind`.
///
/// On success the source VM stays paused (the destination owns the guest
/// now); on failure or cancel it runs on, except after
/// [`MigrationError::Unconfirmed`] (GO sent, STARTED never came): then it
/// stays paused, because the destination may be running the guest; resume
/// it with [`Vm::resume`] only if you know the destination is not.
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
/// and state come from the stream) and receives the migration on `input`
/// through livemig's [`Destination`]: with a return path (`reply`) the
/// setup is checked first (block list, vCPU count: a mismatch is refused
/// before any page is sent, with the reason on the source), then the
/// completion handshake runs: FAILED on a failed load; otherwise LOADED,
/// wait for the source's GO, restore, resume, STARTED.
///
/// `Ok`: the guest runs here. An error: the guest never ran here, except
/// after [`DestinationError::Resume`].
pub fn migrate_in<R: Read + Send, W: Write + Send>(
    config: &VmConfig,
    input: R,
    reply: Option<W>,
) -> Result<(Vm, Arrival), MigrateError> {
    let vm = incoming_vm(config)?;
    let mut reply = reply;
    let reply = reply.as_mut().map(|w| w as &mut (dyn Write + Send));
    let arrival = {
        let mem = vm.memory();
        let mut target = vm.target();
        Destination::new(&*mem, &mut target).run_single(input, reply)?
    };
    Ok((vm, arrival))
}

/// As [`migrate_in`], for a migration that may use page channels: `main`
/// is the first connection; `accept` returns each further connection the
/// source announces (on the same listener).
pub fn migrate_in_channels<R: Read + Send + 'static>(
    config: &VmConfig,
    main: Incoming,
    accept: impl FnMut() -> std::io::Result<R>,
) -> Result<(Vm, Arrival), MigrateError> {
    let vm = incoming_vm(config)?;
    let arrival = {
        let mem = vm.memory();
        let mut target = vm.target();
        Destination::new(&*mem, &mut target).run(main, accept)?
    };
    Ok((vm, arrival))
}

/// A paused VM laid out as `config`, waiting for incoming state: no guest
/// image, memory not prefaulted. Receive into it with livemig's
/// [`Destination`] and [`Vm::target`] (what [`migrate_in`] does).
pub fn incoming_vm(config: &VmConfig) -> Result<Vm, MigrateError> {
    Ok(Vm::new(VmConfig {
        guest: GuestImage::Incoming,
        start_paused: true,
        prefault: false,
        ..config.clone()
    })?)
}
