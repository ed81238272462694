//! Whole-VM migration: guest RAM through livemig's engine, then vCPU and
//! device state in the same stream. Snapshots use the same path with a
//! file transport.

use std::io::{Read, Write};

use livemig::dirty::DirtyError;
use livemig::engine::{
    Arrival, ChannelWriter, Destination, DestinationError, LoadError, LoadOutcome, Loader,
    MigrationError, MigrationHandle, MigrationStats, Source,
};
use livemig::transport::{BoxRead, BoxWrite, Outgoing};
use livemig::vm::{VmControl, VmError as EngineVmError};

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
    /// The incoming migration did not end with the guest running here
    /// (see [`DestinationError`]: before GO the guest never ran here).
    #[error(transparent)]
    Destination(#[from] DestinationError),
    /// The stream ended without vCPU state: not a VM migration.
    #[error("the stream carries no vCPU state: it was not sent by a VM source")]
    NoState,
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

/// As [`migrate_out_channels`], over a connection whose return path the
/// engine owns: the way that can switch to postcopy (`postcopy-ram`).
pub fn migrate_out_conn(
    vm: &Vm,
    kind: TrackerKind,
    handle: MigrationHandle,
    conn: Outgoing,
    open: &mut dyn FnMut(u16) -> std::io::Result<ChannelWriter>,
) -> Result<MigrationStats, MigrateError> {
    let mem = vm.memory();
    let mut tracker = vm.tracker(kind)?;
    let mut control = vm.control();
    Ok(Source::new(&*mem, &mut *tracker, &mut control, handle).run_conn(conn, open)?)
}

/// Creates a paused VM laid out as `config` and receives a migration into
/// it with the library's one destination call ([`Destination`]): page
/// channels, the completion handshake and postcopy (when `postcopy`, the
/// destination's `postcopy-ram`) included. On `Ok` the guest runs here
/// (with postcopy, every page has arrived by then). `reply` is the return
/// path (`None` for a snapshot file); `accept` returns each further
/// connection the source announces on the same listener (page channels,
/// the postcopy urgent connection).
pub fn receive(
    config: &VmConfig,
    input: impl Read + Send,
    reply: Option<BoxWrite>,
    accept: &mut dyn FnMut() -> std::io::Result<BoxRead>,
    postcopy: bool,
) -> Result<(Vm, Arrival), MigrateError> {
    let vm = incoming_vm(config)?;
    let arrival = receive_into(&vm, input, reply, accept, postcopy)?;
    Ok((vm, arrival))
}

/// As [`receive`], into an existing paused VM of the right layout (a
/// minivm started to wait for a migration).
pub fn receive_into(
    vm: &Vm,
    input: impl Read + Send,
    reply: Option<BoxWrite>,
    accept: &mut dyn FnMut() -> std::io::Result<BoxRead>,
    postcopy: bool,
) -> Result<Arrival, MigrateError> {
    let mem = vm.memory();
    let mut control = vm.control();
    Ok(Destination::new(&*mem, &mut control)
        .postcopy(postcopy)
        .run_with(input, reply, accept)?)
}

/// Creates a paused VM from `config` (its guest image is ignored: memory
/// and state come from the stream) and receives a one-stream precopy
/// migration into it ([`Destination`]: FAILED on a failed load; otherwise
/// LOADED, the source's GO, STARTED), but leaves the guest paused: the
/// caller resumes it ([`Vm::resume`]) at once, after looking at the memory
/// as it arrived if it wants to. A failed load, or one the source never
/// said GO to, returns an error and the guest never runs here.
pub fn migrate_in<R: Read + Send, W: Write + Send + 'static>(
    config: &VmConfig,
    input: R,
    reply: Option<W>,
) -> Result<(Vm, LoadOutcome), MigrateError> {
    let vm = incoming_vm(config)?;
    let mem = vm.memory();
    let mut held = HeldPaused(vm.control());
    let arrival = Destination::new(&*mem, &mut held).run_with(
        input,
        reply.map(|w| Box::new(w) as BoxWrite),
        &mut no_channels,
    )?;
    drop(mem);
    Ok((vm, arrival.load))
}

/// The VM for [`migrate_in`]: restores the state, and leaves the resume
/// after GO to the caller.
struct HeldPaused(crate::vm::VmHandle);

impl VmControl for HeldPaused {
    fn pause(&mut self) -> Result<(), EngineVmError> {
        self.0.pause()
    }
    fn resume(&mut self) -> Result<(), EngineVmError> {
        Ok(())
    }
    fn save_state(&mut self) -> Result<Vec<u8>, EngineVmError> {
        self.0.save_state()
    }
    fn restore_state(&mut self, state: &[u8]) -> Result<(), EngineVmError> {
        self.0.restore_state(state)
    }
}

/// For a destination with no listener: a source announcing page channels
/// is refused.
fn no_channels() -> std::io::Result<BoxRead> {
    Err(std::io::Error::other(
        "this destination takes one connection: no page channels",
    ))
}

/// A paused VM laid out as `config`, waiting for incoming state: no guest
/// image, memory not prefaulted. Receive into it with [`receive_into`].
pub fn incoming_vm(config: &VmConfig) -> Result<Vm, MigrateError> {
    Ok(Vm::new(VmConfig {
        guest: GuestImage::Incoming,
        start_paused: true,
        prefault: false,
        ..config.clone()
    })?)
}

/// Creates a paused VM from `config` and loads `input` into it (RAM, vCPU
/// and device state) with no handshake: a snapshot file. A migration with
/// a return path goes through [`receive`].
pub fn load_in<R: Read>(config: &VmConfig, input: R) -> Result<(Vm, LoadOutcome), MigrateError> {
    let vm = incoming_vm(config)?;
    let out = load_into(&vm, input)?;
    Ok((vm, out))
}

fn load_into<R: Read>(vm: &Vm, input: R) -> Result<LoadOutcome, MigrateError> {
    let mem = vm.memory();
    let out = Loader::new(&*mem).load(input)?;
    restore(vm, out)
}

/// Restores the vCPU and device state a load carried.
fn restore(vm: &Vm, out: LoadOutcome) -> Result<LoadOutcome, MigrateError> {
    if out.state.is_empty() {
        return Err(MigrateError::NoState);
    }
    vm.restore_state(&out.state)?;
    Ok(out)
}
