//! Whole-VM migration: guest RAM through livemig's engine, then vCPU and
//! device state in the same stream. Snapshots use the same path with a
//! file transport.

use std::io::{Read, Write};

use livemig::dirty::DirtyError;
use livemig::engine::local::{self, LocalError, LocalGuest, LocalReceived, LocalSent, SharedBlock};
use livemig::engine::{
    Arrival, ChannelWriter, Destination, DestinationError, LoadError, LoadOutcome, Loader,
    MigrationError, MigrationHandle, MigrationStats, Source,
};
use livemig::transport::{BoxRead, BoxWrite, Outgoing};
use livemig::vm::{BoxError, VmControl, VmError as EngineVmError};
use livemig::GuestMemory;
use std::os::unix::net::UnixStream;

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
    /// A local migration (memory handed over, not copied) failed on this
    /// side.
    #[error(transparent)]
    Local(#[from] LocalError),
}

/// Migrates `vm` out through `out`, tracking dirty pages with `kind`.
///
/// On success the source VM stays paused (the destination owns the guest
/// now); on failure or cancel it runs on, except after
/// [`MigrationError::Unconfirmed`] (GO sent, STARTED never came): then it
/// stays paused, because the destination may be running the guest; resume
/// it with [`Vm::resume`] only if you know the destination is not.
///
/// Every way out (this, the channel, connection and local variants)
/// first stops the VM's background collapse into huge pages
/// ([`Vm::stop_collapse`]): it would take CPU from the copy and hold the
/// address space's lock against the sender's reads.
pub fn migrate_out<W: Write>(
    vm: &Vm,
    kind: TrackerKind,
    handle: MigrationHandle,
    out: W,
    ack: Option<&mut dyn Read>,
) -> Result<MigrationStats, MigrateError> {
    vm.stop_collapse();
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
    vm.stop_collapse();
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
    vm.stop_collapse();
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
    receive_recoverable(vm, input, reply, accept, postcopy, None)
}

/// As [`receive_into`]; with `recovery`, a connection lost during
/// postcopy pauses the migration (`postcopy-paused` on that handle) until
/// the source reconnects, instead of losing the guest.
pub fn receive_recoverable(
    vm: &Vm,
    input: impl Read + Send,
    reply: Option<BoxWrite>,
    accept: &mut dyn FnMut() -> std::io::Result<BoxRead>,
    postcopy: bool,
    recovery: Option<&MigrationHandle>,
) -> Result<Arrival, MigrateError> {
    let mem = vm.memory();
    let mut control = vm.control();
    let mut dest = Destination::new(&*mem, &mut control).postcopy(postcopy);
    if let Some(h) = recovery {
        dest = dest.recovery(h);
    }
    Ok(dest.run_with(input, reply, accept)?)
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
    fn shape(&self) -> livemig::vm::VmShape {
        self.0.shape()
    }
    fn setup_hook(&self) -> Option<livemig::vm::SetupHook> {
        self.0.setup_hook()
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

/// Migrates `vm` to a destination on this host over `sock` without
/// copying its memory (`livemig::engine::local`): pauses it, hands its
/// memfds, layout and vCPU/device state over, and runs the completion
/// handshake. The VM's memory must be memfd-backed ([`VmConfig::memfd`],
/// or taken over from an earlier local migration). On success the VM
/// stays paused for good; on failure it runs on (except after
/// [`MigrationError::Unconfirmed`], as for [`migrate_out`]).
pub fn migrate_out_local(
    vm: &Vm,
    handle: &MigrationHandle,
    sock: &UnixStream,
) -> Result<LocalSent, MigrateError> {
    vm.stop_collapse();
    let blocks = vm.shared_blocks()?;
    let mut control = vm.control();
    Ok(local::migrate(sock, &blocks, &mut control, handle)?)
}

/// The destination of a local migration into `vm` (created paused for an
/// incoming migration, the source's layout), in one call: takes the
/// source's memory in place of its own, restores the vCPU and device
/// state, and resumes the guest on the source's GO. On failure before GO
/// the VM gets its own memory back and never runs.
pub fn receive_local(vm: &Vm, sock: &UnixStream) -> Result<LocalReceived, MigrateError> {
    Ok(local::receive(sock, &mut LocalVm(vm))?)
}

/// A [`Vm`] as the destination of a local migration.
struct LocalVm<'a>(&'a Vm);

impl LocalGuest for LocalVm<'_> {
    fn layout(&self) -> Vec<(String, u64)> {
        self.0
            .memory()
            .blocks()
            .iter()
            .map(|b| (b.id().to_string(), b.len()))
            .collect()
    }

    fn adopt(&mut self, blocks: &[SharedBlock], state: &[u8]) -> Result<(), BoxError> {
        if state.is_empty() {
            return Err(MigrateError::NoState.into());
        }
        self.0.adopt_memory(blocks)?;
        self.0.restore_state(state)?;
        Ok(())
    }

    fn discard(&mut self) {
        self.0.release_memory();
    }

    fn resume(&mut self) -> Result<(), BoxError> {
        self.0.resume();
        Ok(())
    }
}
