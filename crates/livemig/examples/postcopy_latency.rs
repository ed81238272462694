//! Postcopy fault latency on loopback TCP: pure postcopy of process
//! memory (random bytes) while a destination thread reads random pages,
//! faulting on the missing ones. Prints, per variant, the median over the
//! runs of the destination's p50 and p99 fault latency (fault to
//! placement, µs), of the remote faults per run and of the postcopy
//! time (the switch to the last page, ms).
//!
//! `cargo run --release -p livemig --features testkit --example
//! postcopy_latency -- [RUNS] [MIB]` (defaults 5, 128).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use livemig::dirty::SoftwareTracker;
use livemig::engine::postcopy::{receive, IncomingGuest};
use livemig::engine::{MigrationHandle, Params, Source};
use livemig::memory::{GuestMemory, ProcessMemory};
use livemig::testkit::workload::{fill_random, PageWriter, XorShift};
use livemig::transport::{connect, Listener};

/// Reads one random page after another from resume until stopped.
struct Reader {
    mem: ProcessMemory,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl IncomingGuest for Reader {
    fn restore(&mut self, _: &[u8]) -> Result<(), livemig::vm::VmError> {
        Ok(())
    }
    fn resume(&mut self) -> Result<(), livemig::vm::VmError> {
        let (mem, stop) = (self.mem.clone(), self.stop.clone());
        self.thread = Some(thread::spawn(move || {
            let mut rng = XorShift::new(3);
            let mut page = vec![0u8; 4096];
            while !stop.load(Ordering::SeqCst) {
                let b = &mem.blocks()[0];
                let p = rng.below(b.pages() as usize);
                b.region().read(p * 4096, &mut page);
                // A guest that does some work between touches.
                thread::sleep(std::time::Duration::from_micros(200));
            }
        }));
        Ok(())
    }
    fn pause(&mut self) {}
}

fn run(mib: u64, params: Params) -> (u64, u64, u64, u64) {
    let layout = [("ram0", mib << 20)];
    let src = ProcessMemory::new(&layout).unwrap();
    let dst = ProcessMemory::new(&layout).unwrap();
    let (mut tracker, log) = SoftwareTracker::new(&src);
    let writer: PageWriter = Arc::new(move |b, off, data| log.write(b, off, data));
    fill_random(src.blocks(), &writer, 9);
    let handle = MigrationHandle::new(params);
    handle.start_postcopy().unwrap();
    let listener = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let uri = listener.local_uri();
    let d2 = dst.clone();
    let dest = thread::spawn(move || {
        let inc = listener.accept().unwrap();
        let mut g = Reader {
            mem: d2.clone(),
            stop: Arc::default(),
            thread: None,
        };
        let mut accept = || -> std::io::Result<Box<dyn std::io::Read + Send>> {
            listener
                .accept()
                .map(|i| i.reader)
                .map_err(std::io::Error::other)
        };
        let r = receive(&d2, inc.reader, inc.ack, &mut g, true, Some(&mut accept));
        g.stop.store(true, Ordering::SeqCst);
        if let Some(t) = g.thread.take() {
            t.join().unwrap();
        }
        r
    });
    let mut vm = livemig::vm::NoVm;
    Source::new(&src, &mut tracker, &mut vm, handle)
        .run_conn(connect(&uri).unwrap(), &mut |_| {
            Ok(connect(&uri).map_err(std::io::Error::other)?.writer)
        })
        .expect("the migration completes");
    let pc = dest.join().unwrap().expect("received").postcopy.unwrap();
    (
        pc.faults.p50_us,
        pc.faults.p99_us,
        pc.faults.faults,
        pc.postcopy_time,
    )
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let runs: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(5);
    let mib: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(128);
    let base = Params {
        postcopy_ram: true,
        ..Params::default()
    };
    let variants = [
        ("one stream", base.clone()),
        (
            "urgent connection",
            Params {
                postcopy_preempt: true,
                ..base.clone()
            },
        ),
        (
            "urgent connection, push capped at 100 MiB/s",
            Params {
                postcopy_preempt: true,
                max_bandwidth: 100 << 20,
                ..base.clone()
            },
        ),
        (
            "2 channels",
            Params {
                channels: 2,
                ..base.clone()
            },
        ),
    ];
    println!("| variant | p50 us | p99 us | faults | postcopy ms | runs (p50/p99) |");
    println!("|---|---:|---:|---:|---:|---|");
    for (name, p) in variants {
        let rs: Vec<(u64, u64, u64, u64)> = (0..runs).map(|_| run(mib, p.clone())).collect();
        let each: Vec<String> = rs.iter().map(|r| format!("{}/{}", r.0, r.1)).collect();
        println!(
            "| {name} | {} | {} | {} | {} | {} |",
            median(rs.iter().map(|r| r.0).collect()),
            median(rs.iter().map(|r| r.1).collect()),
            median(rs.iter().map(|r| r.2).collect()),
            median(rs.iter().map(|r| r.3).collect()),
            each.join(", ")
        );
    }
}
