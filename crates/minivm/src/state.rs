//! Whole-VM state (vCPUs and devices) as a versioned byte blob.
//!
//! Layout: magic `MINIVMST`, version (u32 LE), then sections, each a tag
//! (4 bytes), a length (u32 LE) and that many bytes. A vCPU section holds
//! sub-sections of the same shape. Loading checks every length against the
//! bytes present and against the expected structure size, caps counts before
//! allocating, and never panics on bad input.

use kvm_bindings::{
    kvm_fpu, kvm_mp_state, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
};
use vm_superio::serial::SerialState;

use crate::devices::DeviceState;
use crate::sys::{pod_bytes, pod_from_bytes, Pod};
use crate::vm::{lock, Shared, Vm, VmError};

const MAGIC: &[u8; 8] = b"MINIVMST";
const VERSION: u32 = 1;
/// Largest blob accepted (vCPU state is a few KiB per vCPU).
pub const MAX_STATE_BYTES: usize = 16 << 20;
const MAX_MSRS: usize = 256;

/// MSRs saved per vCPU (those the host refuses are skipped).
const MSR_LIST: &[u32] = &[
    0x10,        // TSC
    0x174,       // SYSENTER_CS
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
    0x1a0,       // MISC_ENABLE
    0x277,       // PAT
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SYSCALL_MASK
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
];

fn bad(what: impl Into<String>) -> VmError {
    VmError::BadState(what.into())
}

struct Writer(Vec<u8>);

impl Writer {
    fn section(&mut self, tag: &[u8; 4], body: &[u8]) {
        self.0.extend_from_slice(tag);
        self.0.extend_from_slice(&(body.len() as u32).to_le_bytes());
        self.0.extend_from_slice(body);
    }
}

/// A section: its tag and body.
type Section<'a> = ([u8; 4], &'a [u8]);

/// Reads sections from a byte slice, bounds-checked.
struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], VmError> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.b.len());
        let Some(end) = end else {
            return Err(bad(format!("truncated {what} at byte {}", self.pos)));
        };
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self, what: &str) -> Result<u32, VmError> {
        let s = self.take(4, what)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self, what: &str) -> Result<u64, VmError> {
        let s = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }
    fn section(&mut self) -> Result<Option<Section<'a>>, VmError> {
        if self.pos == self.b.len() {
            return Ok(None);
        }
        let t = self.take(4, "section tag")?;
        let tag = [t[0], t[1], t[2], t[3]];
        let len = self.u32("section length")? as usize;
        let body = self.take(len, &format!("section {}", String::from_utf8_lossy(&tag)))?;
        Ok(Some((tag, body)))
    }
}

fn pod<T: Pod>(body: &[u8], what: &str) -> Result<T, VmError> {
    pod_from_bytes(body).ok_or_else(|| {
        bad(format!(
            "{what}: {} bytes, expected {}",
            body.len(),
            std::mem::size_of::<T>()
        ))
    })
}

fn ioctl_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |e| VmError::Kvm {
        op,
        source: std::io::Error::from_raw_os_error(e.errno()),
    }
}

/// Saves the state of a paused VM.
pub(crate) fn save(sh: &Shared) -> Result<Vec<u8>, VmError> {
    if !sh.is_paused() {
        return Err(VmError::NotPaused("saving VM state"));
    }
    let mut w = Writer(Vec::new());
    w.0.extend_from_slice(MAGIC);
    w.0.extend_from_slice(&VERSION.to_le_bytes());
    let mut conf = Vec::new();
    conf.extend_from_slice(&(sh.vcpus.len() as u32).to_le_bytes());
    conf.extend_from_slice(&sh.config.mem_size.to_le_bytes());
    conf.extend_from_slice(&(sh.slots.len() as u32).to_le_bytes());
    for s in &sh.slots {
        conf.extend_from_slice(&s.gpa.to_le_bytes());
        conf.extend_from_slice(&s.size.to_le_bytes());
    }
    w.section(b"VMCF", &conf);
    // The host-set guest write rate is part of the guest's behaviour: it
    // moves with the guest.
    w.section(
        b"RATE",
        &sh.rate_per_vcpu
            .load(std::sync::atomic::Ordering::Relaxed)
            .to_le_bytes(),
    );
    for (i, v) in sh.vcpus.iter().enumerate() {
        let fd = lock(&v.fd);
        let mut c = Writer(Vec::new());
        c.0.extend_from_slice(&(i as u32).to_le_bytes());
        c.0.push(u8::from(
            v.active.load(std::sync::atomic::Ordering::Acquire),
        ));
        c.section(
            b"REGS",
            pod_bytes(&fd.get_regs().map_err(ioctl_err("GET_REGS"))?),
        );
        c.section(
            b"SREG",
            pod_bytes(&fd.get_sregs().map_err(ioctl_err("GET_SREGS"))?),
        );
        c.section(
            b"FPU ",
            pod_bytes(&fd.get_fpu().map_err(ioctl_err("GET_FPU"))?),
        );
        c.section(
            b"XSAV",
            pod_bytes(&fd.get_xsave().map_err(ioctl_err("GET_XSAVE"))?),
        );
        c.section(
            b"XCRS",
            pod_bytes(&fd.get_xcrs().map_err(ioctl_err("GET_XCRS"))?),
        );
        c.section(
            b"EVNT",
            pod_bytes(&fd.get_vcpu_events().map_err(ioctl_err("GET_VCPU_EVENTS"))?),
        );
        if let Ok(mp) = fd.get_mp_state() {
            c.section(b"MPST", pod_bytes(&mp));
        }
        let mut body = Vec::new();
        for &index in MSR_LIST {
            let mut msrs = Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
                index,
                ..Default::default()
            }])
            .map_err(|e| bad(format!("msr list: {e:?}")))?;
            if fd.get_msrs(&mut msrs) == Ok(1) {
                body.extend_from_slice(&index.to_le_bytes());
                body.extend_from_slice(&msrs.as_slice()[0].data.to_le_bytes());
            }
        }
        c.section(b"MSRS", &body);
        w.section(b"VCPU", &c.0);
    }
    let d = lock(&sh.devices).state();
    let s = &d.serial;
    let mut dev = vec![
        s.baud_divisor_low,
        s.baud_divisor_high,
        s.interrupt_enable,
        s.interrupt_identification,
        s.line_control,
        s.line_status,
        s.modem_control,
        s.modem_status,
        s.scratch,
        d.port92,
    ];
    dev.extend_from_slice(&(s.in_buffer.len() as u32).to_le_bytes());
    dev.extend_from_slice(&s.in_buffer);
    w.section(b"DEVS", &dev);
    Ok(w.0)
}

struct VcpuState {
    id: usize,
    active: bool,
    regs: kvm_regs,
    sregs: kvm_sregs,
    fpu: kvm_fpu,
    xsave: kvm_xsave,
    xcrs: kvm_xcrs,
    events: kvm_vcpu_events,
    mp: Option<kvm_mp_state>,
    msrs: Vec<(u32, u64)>,
}

fn parse_vcpu(body: &[u8], nvcpus: usize) -> Result<VcpuState, VmError> {
    let mut r = Reader { b: body, pos: 0 };
    let id = r.u32("vCPU id")? as usize;
    if id >= nvcpus {
        return Err(bad(format!("vCPU id {id} but the VM has {nvcpus}")));
    }
    let active = r.take(1, "vCPU active flag")?[0] != 0;
    let (mut regs, mut sregs, mut fpu, mut xsave, mut xcrs, mut events) =
        (None, None, None, None, None, None);
    let mut mp = None;
    let mut msrs = Vec::new();
    while let Some((tag, b)) = r.section()? {
        match &tag {
            b"REGS" => regs = Some(pod(b, "REGS")?),
            b"SREG" => sregs = Some(pod(b, "SREG")?),
            b"FPU " => fpu = Some(pod(b, "FPU")?),
            b"XSAV" => xsave = Some(pod(b, "XSAV")?),
            b"XCRS" => xcrs = Some(pod(b, "XCRS")?),
            b"EVNT" => events = Some(pod(b, "EVNT")?),
            b"MPST" => mp = Some(pod(b, "MPST")?),
            b"MSRS" => {
                if b.len() % 12 != 0 || b.len() / 12 > MAX_MSRS {
                    return Err(bad(format!("MSRS section of {} bytes", b.len())));
                }
                let mut m = Reader { b, pos: 0 };
                while m.pos < b.len() {
                    msrs.push((m.u32("msr index")?, m.u64("msr value")?));
                }
            }
            _ => {
                return Err(bad(format!(
                    "unknown vCPU section {:?}",
                    String::from_utf8_lossy(&tag)
                )))
            }
        }
    }
    let need = |what: &str| bad(format!("vCPU {id}: missing {what}"));
    Ok(VcpuState {
        id,
        active,
        regs: regs.ok_or_else(|| need("REGS"))?,
        sregs: sregs.ok_or_else(|| need("SREG"))?,
        fpu: fpu.ok_or_else(|| need("FPU"))?,
        xsave: xsave.ok_or_else(|| need("XSAV"))?,
        xcrs: xcrs.ok_or_else(|| need("XCRS"))?,
        events: events.ok_or_else(|| need("EVNT"))?,
        mp,
        msrs,
    })
}

/// Restores a blob from [`save`] into a paused VM with the same layout.
/// Everything is parsed and checked before any vCPU is touched.
pub(crate) fn restore(sh: &Shared, blob: &[u8]) -> Result<(), VmError> {
    if !sh.is_paused() {
        return Err(VmError::NotPaused("restoring VM state"));
    }
    if blob.len() > MAX_STATE_BYTES {
        return Err(bad(format!(
            "{} bytes exceed the {MAX_STATE_BYTES} byte limit",
            blob.len()
        )));
    }
    let mut r = Reader { b: blob, pos: 0 };
    if r.take(8, "magic")? != MAGIC {
        return Err(bad("not a minivm state blob (bad magic)"));
    }
    let version = r.u32("version")?;
    if version != VERSION {
        return Err(bad(format!(
            "version {version}, this minivm reads {VERSION}"
        )));
    }
    let mut vcpus: Vec<Option<VcpuState>> = (0..sh.vcpus.len()).map(|_| None).collect();
    let mut devs = None;
    let mut rate = None;
    let mut conf_seen = false;
    while let Some((tag, body)) = r.section()? {
        match &tag {
            b"VMCF" => {
                let mut c = Reader { b: body, pos: 0 };
                let n = c.u32("vCPU count")? as usize;
                let mem = c.u64("memory size")?;
                let nslots = c.u32("slot count")? as usize;
                if n != sh.vcpus.len() || mem != sh.config.mem_size || nslots != sh.slots.len() {
                    return Err(bad(format!(
                        "state is for {n} vCPUs / {mem} bytes / {nslots} slots; this VM has {} / {} / {}",
                        sh.vcpus.len(),
                        sh.config.mem_size,
                        sh.slots.len()
                    )));
                }
                for s in &sh.slots {
                    let (gpa, size) = (c.u64("slot address")?, c.u64("slot size")?);
                    if (gpa, size) != (s.gpa, s.size) {
                        return Err(bad(format!("slot {} layout differs", s.slot)));
                    }
                }
                conf_seen = true;
            }
            b"RATE" => {
                let mut c = Reader { b: body, pos: 0 };
                rate = Some(c.u64("guest rate")?);
            }
            b"VCPU" => {
                let v = parse_vcpu(body, sh.vcpus.len())?;
                let id = v.id;
                if vcpus[id].replace(v).is_some() {
                    return Err(bad(format!("vCPU {id} appears twice")));
                }
            }
            b"DEVS" => {
                let mut d = Reader { b: body, pos: 0 };
                let f = d.take(10, "device registers")?;
                let n = d.u32("serial FIFO length")? as usize;
                if n > 64 {
                    return Err(bad(format!("serial FIFO of {n} bytes")));
                }
                let in_buffer = d.take(n, "serial FIFO")?.to_vec();
                devs = Some(DeviceState {
                    serial: SerialState {
                        baud_divisor_low: f[0],
                        baud_divisor_high: f[1],
                        interrupt_enable: f[2],
                        interrupt_identification: f[3],
                        line_control: f[4],
                        line_status: f[5],
                        modem_control: f[6],
                        modem_status: f[7],
                        scratch: f[8],
                        in_buffer,
                    },
                    port92: f[9],
                });
            }
            _ => {
                return Err(bad(format!(
                    "unknown section {:?}",
                    String::from_utf8_lossy(&tag)
                )))
            }
        }
    }
    if !conf_seen {
        return Err(bad("missing VMCF section"));
    }
    let vcpus: Vec<VcpuState> = vcpus
        .into_iter()
        .enumerate()
        .map(|(i, v)| v.ok_or_else(|| bad(format!("missing vCPU {i}"))))
        .collect::<Result<_, _>>()?;
    let devs = devs.ok_or_else(|| bad("missing DEVS section"))?;
    let rate = rate.ok_or_else(|| bad("missing RATE section"))?;

    for v in &vcpus {
        let slot = &sh.vcpus[v.id];
        let fd = lock(&slot.fd);
        fd.set_sregs(&v.sregs).map_err(ioctl_err("SET_SREGS"))?;
        fd.set_regs(&v.regs).map_err(ioctl_err("SET_REGS"))?;
        fd.set_fpu(&v.fpu).map_err(ioctl_err("SET_FPU"))?;
        crate::sys::set_xsave(&fd, &v.xsave).map_err(ioctl_err("SET_XSAVE"))?;
        fd.set_xcrs(&v.xcrs).map_err(ioctl_err("SET_XCRS"))?;
        let entries: Vec<_> = v
            .msrs
            .iter()
            .map(|&(index, data)| kvm_bindings::kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries).map_err(|e| bad(format!("msrs: {e:?}")))?;
        let n = fd.set_msrs(&msrs).map_err(ioctl_err("SET_MSRS"))?;
        if n != entries.len() {
            log::warn!("vCPU {}: KVM accepted {n} of {} MSRs", v.id, entries.len());
        }
        fd.set_vcpu_events(&v.events)
            .map_err(ioctl_err("SET_VCPU_EVENTS"))?;
        if let Some(mp) = v.mp {
            fd.set_mp_state(mp).map_err(ioctl_err("SET_MP_STATE"))?;
        }
        slot.active
            .store(v.active, std::sync::atomic::Ordering::Release);
    }
    lock(&sh.devices)
        .restore(&devs, &sh.serial_out)
        .map_err(bad)?;
    sh.rate_per_vcpu
        .store(rate, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

impl Vm {
    /// The vCPU and device state of the paused VM, as a versioned blob.
    pub fn save_state(&self) -> Result<Vec<u8>, VmError> {
        save(&self.shared)
    }

    /// Loads a blob from [`Vm::save_state`] into this paused VM (same vCPU
    /// count and memory layout). Then [`Vm::resume`] continues the guest.
    pub fn restore_state(&self, blob: &[u8]) -> Result<(), VmError> {
        restore(&self.shared, blob)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_rejects_truncation() {
        let mut r = Reader {
            b: &[1, 2, 3],
            pos: 0,
        };
        assert!(r.u32("x").is_err());
        let mut r = Reader {
            b: b"ABCD\xff\x00\x00\x00xx",
            pos: 0,
        };
        assert!(r.section().is_err());
    }
}
