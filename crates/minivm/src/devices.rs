//! Devices: the 16550 serial at 0x3f8 (vm-superio) and port 0x92 (port
//! I/O), and a clock page the VMM writes into guest memory.

use std::fs::File;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};

/// First I/O port of COM1.
pub const SERIAL_BASE: u16 = 0x3f8;
/// System control port A (fast A20).
pub const PORT_A20: u16 = 0x92;

/// How often the clock page is written while the VM runs.
pub const CLOCK_PERIOD: std::time::Duration = std::time::Duration::from_millis(1);
/// A free page of the built-in test guest's layout, for the clock page.
pub const CLOCK_PAGE_ADDR: u64 = 0x1f_f000;

/// The clock page: a device that writes guest memory from the VMM, as a
/// paravirtual clock's shared page or a virtio device's completions are
/// written. Every [`CLOCK_PERIOD`] while the VM runs, it adds one to the
/// tick count (u64) at its guest address.
///
/// It writes through vm-memory (`GuestMemoryMmap<AtomicBitmap>`), whose
/// dirty bitmap records the write: KVM's dirty log never sees writes the
/// VMM makes, and livemig merges that bitmap at every sync, so a tick
/// written during a migration reaches the destination.
#[derive(Clone, Copy, Debug)]
pub struct ClockPage {
    /// Guest-physical address of the tick count.
    pub addr: u64,
}

impl ClockPage {
    /// One tick: count + 1, written through `mem`. Callers make sure the
    /// VM is not paused (the tick must land before a pause returns).
    pub fn tick(&self, mem: &crate::vm::GuestMemoryMmap) {
        let a = GuestAddress(self.addr);
        if let Ok(n) = mem.read_obj::<u64>(a) {
            let _ = mem.write_obj(n.wrapping_add(1), a);
        }
    }

    /// The tick count now in guest memory.
    pub fn ticks(&self, mem: &crate::vm::GuestMemoryMmap) -> u64 {
        mem.read_obj(GuestAddress(self.addr)).unwrap_or(0)
    }
}

/// Where the serial port's output goes.
#[derive(Clone, Debug, Default)]
pub enum SerialOut {
    /// Discarded.
    #[default]
    Sink,
    /// This process's stdout.
    Stdout,
    /// A file, created or truncated.
    File(PathBuf),
    /// An in-memory buffer (for tests and embedding).
    Buffer(Arc<Mutex<Vec<u8>>>),
}

impl SerialOut {
    fn writer(&self) -> io::Result<Box<dyn Write + Send>> {
        Ok(match self {
            SerialOut::Sink => Box::new(io::sink()),
            SerialOut::Stdout => Box::new(io::stdout()),
            SerialOut::File(p) => Box::new(File::create(p)?),
            SerialOut::Buffer(b) => Box::new(BufferWriter(b.clone())),
        })
    }
}

struct BufferWriter(Arc<Mutex<Vec<u8>>>);

impl Write for BufferWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// No interrupt controller: serial interrupts go nowhere.
#[derive(Debug, Default)]
pub struct NoIrq;

impl Trigger for NoIrq {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        Ok(())
    }
}

type Uart = Serial<NoIrq, NoEvents, Box<dyn Write + Send>>;

/// The VM's port I/O devices.
pub struct Devices {
    serial: Uart,
    port92: u8,
}

impl std::fmt::Debug for Devices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Devices")
            .field("port92", &self.port92)
            .finish()
    }
}

/// Device state as saved in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceState {
    /// The UART's registers and input FIFO.
    pub serial: SerialState,
    /// Last value written to port 0x92.
    pub port92: u8,
}

impl Devices {
    /// Devices with the serial output going to `out`.
    pub fn new(out: &SerialOut) -> io::Result<Self> {
        Ok(Devices {
            serial: Serial::new(NoIrq, out.writer()?),
            port92: 0,
        })
    }

    /// Handles `out` to `port`; false if no device claims it.
    pub fn write(&mut self, port: u16, data: &[u8]) -> bool {
        match port {
            SERIAL_BASE..=0x3ff => {
                if let Some(&b) = data.first() {
                    // Output errors are not the guest's concern.
                    let _ = self.serial.write((port - SERIAL_BASE) as u8, b);
                    let _ = self.serial.writer_mut().flush();
                }
                true
            }
            PORT_A20 => {
                self.port92 = data.first().copied().unwrap_or(0) & !1;
                true
            }
            _ => false,
        }
    }

    /// Handles `in` from `port`, filling `data`; false if no device claims it.
    pub fn read(&mut self, port: u16, data: &mut [u8]) -> bool {
        let v = match port {
            SERIAL_BASE..=0x3ff => self.serial.read((port - SERIAL_BASE) as u8),
            PORT_A20 => self.port92,
            _ => return false,
        };
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = v;
        }
        true
    }

    /// The state to snapshot.
    pub fn state(&self) -> DeviceState {
        DeviceState {
            serial: self.serial.state(),
            port92: self.port92,
        }
    }

    /// Restores a snapshot, keeping the current output.
    pub fn restore(&mut self, st: &DeviceState, out: &SerialOut) -> Result<(), String> {
        let serial = Serial::from_state(
            &st.serial,
            NoIrq,
            NoEvents,
            out.writer().map_err(|e| e.to_string())?,
        )
        .map_err(|e| format!("serial state rejected: {e:?}"))?;
        self.serial = serial;
        self.port92 = st.port92;
        Ok(())
    }
}
