//! Whole-VM migration: guest RAM through livemig's engine, then vCPU and
//! device state in the same stream. Snapshots use the same path with a
//! file transport.

use std::io::{Read, Write};

use livemig::dirty::DirtyError;
use livemig::engine::local::{self, LocalError, LocalGuest, LocalReceived, LocalSent, SharedBlock};
use livemig::engine::postcopy::{receive, IncomingGuest, ReceiveError, Received};
use livemig::engine::{
    ChannelWriter, Commit, CommitError, LoadError, LoadOutcome, Loader, MigrationError,
    MigrationHandle, MigrationStats, Source,
};
use livemig::transport::Outgoing;
use livemig::vm::BoxError;
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
    /// Loaded, but the source never said GO: the VM is discarded unrun.
    #[error(transparent)]
    Commit(#[from] CommitError),
    /// Receiving (with or without postcopy) failed.
    #[error(transparent)]
    Receive(#[from] ReceiveError),
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

/// The VM as `livemig::engine::postcopy::receive` drives it.
struct IncomingVm<'a>(&'a Vm);

impl IncomingGuest for IncomingVm<'_> {
    fn restore(&mut self, state: &[u8]) -> Result<(), String> {
        if state.is_empty() {
            return Err(MigrateError::NoState.to_string());
        }
        self.0
            .restore_state(state)
            .map_err(|e| livemig::error_chain(&e))
    }

    fn resume(&mut self) -> Result<(), String> {
        self.0.resume();
        Ok(())
    }

    fn pause(&mut self) {
        // vCPUs waiting for a missing page cannot park: they stay blocked.
        if let Err(e) = self.0.pause() {
            log::warn!("pausing the guest after the source was lost: {e}");
        }
    }
}

/// Creates a paused VM from `config`, receives a migration into it and
/// runs it: the whole destination in one call, postcopy included when
/// `allow_postcopy` (the destination's `postcopy-ram`). On `Ok` the guest
/// runs here (with postcopy, every page has arrived by then). `reply` is
/// the return path (`None` for a snapshot file); `accept` returns the next
/// connection on the listener (the postcopy urgent connection of a source
/// with `postcopy-preempt`).
pub fn receive_vm<R: Read>(
    config: &VmConfig,
    input: R,
    reply: Option<Box<dyn Write + Send>>,
    allow_postcopy: bool,
    accept: Option<&mut dyn FnMut() -> std::io::Result<Box<dyn Read + Send>>>,
) -> Result<(Vm, Received), MigrateError> {
    let vm = incoming_vm(config)?;
    let mem = vm.memory();
    let received = receive(
        &*mem,
        input,
        reply,
        &mut IncomingVm(&vm),
        allow_postcopy,
        accept,
    )?;
    drop(mem);
    Ok((vm, received))
}

/// Creates a paused VM from `config` (its guest image is ignored: memory
/// and state come from the stream), loads `input` into it and restores the
/// vCPU and device state, then, with a return path (`reply`), runs the
/// destination's half of the completion handshake (`livemig::engine::Commit`):
/// FAILED on a failed load; otherwise LOADED, wait for the source's GO,
/// STARTED.
///
/// `Ok` means the guest is this side's: the VM is returned paused and the
/// caller resumes it ([`Vm::resume`]) at once. A failed load, or a load
/// the source never said GO to, returns an error and the guest never runs
/// here. For a VMM that wants to resume before STARTED goes out, or to
/// check more before LOADED, [`load_in`] stops after the load.
pub fn migrate_in<R: Read, W: Write>(
    config: &VmConfig,
    input: R,
    reply: Option<W>,
) -> Result<(Vm, LoadOutcome), MigrateError> {
    let mut input = input;
    let loaded = load_in(config, &mut input);
    let commit = match reply {
        Some(w) => Commit::new(input, w),
        None => Commit::none(),
    };
    match loaded {
        Err(e) => {
            commit.fail(&livemig::error_chain(&e));
            Err(e)
        }
        Ok((vm, out)) => {
            let go = commit.wait_go()?;
            if let Err(e) = go.started() {
                // The source stays paused and says so; the guest is ours.
                log::warn!("GO received but STARTED could not be sent ({e}): the guest runs here, the source stays paused");
            }
            Ok((vm, out))
        }
    }
}

/// A paused VM laid out as `config`, waiting for incoming state: no guest
/// image, memory not prefaulted.
fn incoming_vm(config: &VmConfig) -> Result<Vm, MigrateError> {
    Ok(Vm::new(VmConfig {
        guest: GuestImage::Incoming,
        start_paused: true,
        prefault: false,
        ..config.clone()
    })?)
}

/// Creates a paused VM from `config` and loads `input` into it (RAM, vCPU
/// and device state); no handshake. On a two-way transport, answer with
/// `livemig::engine::Commit` (`wait_go` before resuming, `fail` if the VM
/// is refused).
pub fn load_in<R: Read>(config: &VmConfig, input: R) -> Result<(Vm, LoadOutcome), MigrateError> {
    let vm = incoming_vm(config)?;
    let out = load_into(&vm, input)?;
    Ok((vm, out))
}

/// As [`load_in`], for a migration that may use page channels: `accept`
/// returns each further connection the source announces (on the same
/// listener); the main stream is `input`.
pub fn load_in_channels<'a>(
    config: &VmConfig,
    input: Box<dyn Read + Send + 'a>,
    accept: impl FnMut() -> std::io::Result<Box<dyn Read + Send + 'a>>,
) -> Result<(Vm, LoadOutcome), MigrateError> {
    let vm = incoming_vm(config)?;
    let mem = vm.memory();
    let out = Loader::new(&*mem).load_channels(input, accept)?;
    drop(mem);
    restore(&vm, out).map(|out| (vm, out))
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
