//! Whole-VM snapshots in livemig's mapped-ram layout
//! ([`livemig::snapshot`]): save a paused VM with several threads,
//! restore it eagerly or lazily (the guest runs before its memory is in),
//! and snapshot a running VM in the background.

use std::path::Path;
use std::time::{Duration, Instant};

use livemig::snapshot::{
    background_save, BackgroundOptions, BackgroundStats, LazyOptions, LazyRestore, LoadOptions,
    MappedRamFile, RestoreStats, SaveOptions, SaveStats, SnapshotError,
};

use crate::guest::GuestImage;
use crate::vm::{Vm, VmConfig, VmError};

/// Why a VM snapshot or restore failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotVmError {
    /// Creating, pausing or restoring the VM failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Writing, reading or serving the file failed.
    #[error(transparent)]
    File(#[from] SnapshotError),
    /// The file holds process memory, not a VM.
    #[error("the snapshot carries no vCPU state: it is a process-memory snapshot, not a VM's (load it with `livemig load`)")]
    NoState,
}

/// A VM saved to a file.
#[derive(Clone, Debug)]
pub struct Saved {
    /// The file's figures.
    pub stats: SaveStats,
    /// How long the guest was paused before the save (the VM stays paused).
    pub pause: Duration,
}

/// Pauses `vm` and saves its memory and state to `path` (`opts`: threads,
/// `O_DIRECT`). The VM stays paused (its memory is what the file holds);
/// resume it to run on.
pub fn save(vm: &Vm, path: &Path, opts: &SaveOptions) -> Result<Saved, SnapshotVmError> {
    let t = Instant::now();
    vm.stop_collapse();
    vm.pause()?;
    let state = vm.save_state()?;
    let stats = livemig::snapshot::save(&*vm.memory(), path, &state, opts)?;
    Ok(Saved {
        stats,
        pause: t.elapsed(),
    })
}

/// Takes a background snapshot of the running `vm` (see
/// [`livemig::snapshot::background`]): the guest is paused only while
/// write protection is re-armed and its state saved.
pub fn save_background(
    vm: &Vm,
    path: &Path,
    opts: &BackgroundOptions,
) -> Result<BackgroundStats, SnapshotVmError> {
    vm.stop_collapse();
    let mut control = vm.control();
    Ok(background_save(&*vm.memory(), path, &mut control, opts)?)
}

fn incoming_vm(config: &VmConfig) -> Result<Vm, VmError> {
    Vm::new(VmConfig {
        guest: GuestImage::Incoming,
        start_paused: true,
        prefault: false,
        ..config.clone()
    })
}

/// Creates a paused VM laid out as `config` and loads the file at `path`
/// into it (every chunk checked before it is written), then its state.
/// The caller resumes it.
pub fn restore(
    config: &VmConfig,
    path: &Path,
    threads: usize,
) -> Result<(Vm, RestoreStats), SnapshotVmError> {
    let vm = incoming_vm(config)?;
    let file = MappedRamFile::open_for(path, &*vm.memory())?;
    let state = file.state()?;
    if state.is_empty() {
        return Err(SnapshotVmError::NoState);
    }
    let stats = file.load(
        &*vm.memory(),
        &LoadOptions {
            threads,
            fresh: true,
        },
    )?;
    vm.restore_state(&state)?;
    Ok((vm, stats))
}

/// A VM resumed before its memory was loaded.
#[derive(Debug)]
pub struct LazyVm {
    /// The VM, running.
    pub vm: Vm,
    /// The restore serving its memory. Dropping it first loads every
    /// chunk still missing (the guest's memory is never left incomplete
    /// and unregistered); after a damaged chunk it keeps the memory
    /// registered for good.
    pub restore: LazyRestore,
    /// From opening the file to the guest resumed.
    pub time_to_resume: Duration,
    /// Creating the (empty, paused) VM before that.
    pub vm_create: Duration,
}

/// Creates a VM laid out as `config`, restores its state from the file at
/// `path`, serves its memory lazily from the file and resumes it.
pub fn restore_lazy(config: &VmConfig, path: &Path) -> Result<LazyVm, SnapshotVmError> {
    let t = Instant::now();
    let vm = incoming_vm(config)?;
    let vm_create = t.elapsed();
    let t = Instant::now();
    let file = MappedRamFile::open_for(path, &*vm.memory())?;
    let state = file.state()?;
    if state.is_empty() {
        return Err(SnapshotVmError::NoState);
    }
    let restore = LazyRestore::start(file, &*vm.memory(), &LazyOptions::default())?;
    vm.restore_state(&state)?;
    vm.resume();
    Ok(LazyVm {
        vm,
        restore,
        time_to_resume: t.elapsed(),
        vm_create,
    })
}
