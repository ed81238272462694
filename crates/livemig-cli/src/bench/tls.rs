//! What TLS costs: raw TLS stream throughput against the raw loopback TCP
//! reference, and the same idle guest migrated over loopback TCP plain and
//! over TLS (1 and 2 page channels), runs interleaved, medians and ratios
//! to references measured in the same run.

use std::net::TcpStream;

use livemig::transport::tls::{
    connect_deferred, connect_with_session, Pki, TlsConfig, TlsListener, TlsSession,
};

use super::*;

/// One certificate for both ends (the bench measures the data path).
fn bench_config() -> Result<TlsConfig> {
    let pki = Pki::generate(&["bench"], &["127.0.0.1"])?;
    let (_, cert, key) = &pki.peers[0];
    Ok(TlsConfig::from_pem(
        pki.ca_cert.as_bytes(),
        cert.as_bytes(),
        key.as_bytes(),
    )?)
}

/// Bytes per second of `total` bytes over one TLS connection on loopback
/// TCP, written in 1 MiB writes by one thread and read by another.
fn tls_stream_rate(tls: &TlsConfig, data: &[u8], total: u64) -> Result<(f64, TlsSession)> {
    let l = TlsListener::bind(&Uri::Tcp("127.0.0.1:0".into()), tls)?;
    let uri = l.local_uri();
    let (rx, (out, session)) = std::thread::scope(|s| -> Result<_> {
        let server = s.spawn(|| l.accept());
        let client = connect_with_session(&uri, tls);
        let inc = server
            .join()
            .map_err(|_| anyhow!("TLS accept panicked"))??;
        Ok((inc.reader, client?))
    })?;
    // With both halves dropped the session ends (close_notify): the
    // reader's end of stream comes when `stream_rate` drops the writer.
    drop(out.ack);
    let bps = stream_rate(out.writer, rx, data, total, |_| {})?;
    Ok((bps, session))
}

/// As `migrate_once` over loopback TCP, with TLS on every connection.
fn migrate_tls_once(
    src: &ProcessMemory,
    dst: &ProcessMemory,
    tracker: &mut dyn DirtyTracker,
    params: Params,
    tls: &TlsConfig,
) -> Result<MigRun> {
    let listener = TlsListener::bind(&Uri::Tcp("127.0.0.1:0".into()), tls)?;
    let target = listener.local_uri();
    let handle = MigrationHandle::new(params);
    std::thread::scope(|s| {
        let dest = s.spawn(|| {
            let c0 = thread_cpu_secs();
            let r = receive(dst, || listener.accept());
            (r, thread_cpu_secs() - c0)
        });
        let cpu0 = cpu_secs();
        let thread0 = thread_cpu_secs();
        let t0 = Instant::now();
        let result = match connect_with_session(&target, tls) {
            Ok((out, _)) => send(src, tracker, &mut NoVm, &handle, out, &mut |_| {
                Ok(connect_deferred(&target, tls)
                    .map_err(std::io::Error::other)?
                    .writer)
            }),
            Err(e) => {
                // Unblock the destination's accept (its handshake fails).
                if let Uri::Tcp(a) = &target {
                    let _ = TcpStream::connect(a);
                }
                Err(e.into())
            }
        };
        let secs = t0.elapsed().as_secs_f64();
        finish(secs, cpu0, thread_cpu_secs() - thread0, dest, result)
    })
}

/// One migration case, plain or TLS.
#[derive(Clone, Debug, Serialize)]
pub(super) struct TlsRow {
    name: String,
    tls: bool,
    channels: u16,
    guest_bytes: u64,
    /// Median over runs.
    secs: f64,
    guest_bytes_per_sec: f64,
    stream_bytes_per_sec: f64,
    /// Stream throughput over the raw loopback TCP reference.
    stream_ratio_to_tcp_loopback: f64,
    /// Guest throughput of this row over the plain row with as many
    /// channels (1 for the plain rows themselves).
    ratio_to_plain: f64,
    /// CPU seconds per GiB of guest moved (median), both sides.
    cpu_secs_per_gib: f64,
    verified: bool,
    runs: Vec<RunFig>,
}

/// The TLS part of the bench.
#[derive(Clone, Debug, Serialize)]
pub(super) struct TlsSummary {
    protocol: String,
    cipher_suite: String,
    /// Raw TLS stream throughput (median and samples).
    stream: Reference,
    /// That over the raw loopback TCP reference.
    stream_ratio_to_tcp_loopback: f64,
    rows: Vec<TlsRow>,
}

fn run_fig(size: u64, r: &MigRun) -> RunFig {
    let stream = r.stats.ram.transferred;
    RunFig {
        secs: r.secs,
        cpu_secs: r.cpu,
        source_thread_cpu_secs: r.source_cpu,
        destination_thread_cpu_secs: r.destination_cpu,
        stream_bytes: stream,
        guest_bytes_per_sec: size as f64 / r.secs,
        stream_bytes_per_sec: stream as f64 / r.secs,
    }
}

pub(super) fn tls_cost(c: &Config, refs: &References, json: bool) -> Result<TlsSummary> {
    let tls = bench_config()?;
    note(
        json,
        &format!(
            "TLS stream over loopback TCP ({} per run)",
            human(c.link_bytes)
        ),
    );
    let data = touched((c.memcpy_size as usize).max(1 << 20), 9);
    let mut samples = Vec::new();
    let mut session = None;
    for _ in 0..c.runs.max(3) {
        let (bps, s) = tls_stream_rate(&tls, &data, c.link_bytes)?;
        samples.push(bps);
        session = Some(s);
    }
    drop(data);
    let session = session.expect("at least one run");
    let stream = Reference {
        bytes_per_sec: median(&samples),
        samples,
        what: format!(
            "{} in 1 MiB writes over one TLS connection on 127.0.0.1 TCP, two threads",
            human(c.link_bytes)
        ),
    };

    let size = c.size;
    let layout = [("ram0", size)];
    note(
        json,
        &format!("filling a {} guest: Incompressible", human(size)),
    );
    let src = ProcessMemory::new(&layout)?;
    fill_content(&src, Content::Incompressible);
    let dst = ProcessMemory::new(&layout)?;
    zero_memory(&dst);
    let link = refs.tcp_loopback.bytes_per_sec;
    let mut rows = Vec::new();
    for channels in [1u16, 2] {
        let params = Params {
            verify: false,
            channels,
            ..Params::default()
        };
        let mut figs: [Vec<RunFig>; 2] = [Vec::new(), Vec::new()];
        let mut verified = [false; 2];
        // Plain and TLS runs alternate, so drift affects both alike.
        for i in 0..c.runs {
            for (k, with_tls) in [false, true].into_iter().enumerate() {
                note(
                    json,
                    &format!(
                        "migrating incompressible, {channels}ch, {} (run {})",
                        if with_tls { "TLS" } else { "plain TCP" },
                        i + 1
                    ),
                );
                zero_memory(&dst);
                let (mut tracker, _) = tracker_for(&src);
                let r = if with_tls {
                    migrate_tls_once(&src, &dst, tracker.as_mut(), params.clone(), &tls)?
                } else {
                    migrate_once(
                        &src,
                        &dst,
                        tracker.as_mut(),
                        &mut NoVm,
                        params.clone(),
                        Link::Tcp,
                        None,
                    )?
                };
                if i == 0 {
                    verified[k] = memory_digest(&src) == memory_digest(&dst);
                    if !verified[k] {
                        bail!("TLS bench: destination memory differs from the source");
                    }
                }
                figs[k].push(run_fig(size, &r));
            }
        }
        let med =
            |f: &[RunFig], g: fn(&RunFig) -> f64| median(&f.iter().map(g).collect::<Vec<_>>());
        let plain_guest = med(&figs[0], |r| r.guest_bytes_per_sec);
        for (k, with_tls) in [false, true].into_iter().enumerate() {
            let f = std::mem::take(&mut figs[k]);
            let g = med(&f, |r| r.guest_bytes_per_sec);
            let st = med(&f, |r| r.stream_bytes_per_sec);
            rows.push(TlsRow {
                name: format!(
                    "incompressible, {channels}ch, {}",
                    if with_tls { "TLS" } else { "plain" }
                ),
                tls: with_tls,
                channels,
                guest_bytes: size,
                secs: med(&f, |r| r.secs),
                guest_bytes_per_sec: g,
                stream_bytes_per_sec: st,
                stream_ratio_to_tcp_loopback: ratio(st, link),
                ratio_to_plain: ratio(g, plain_guest),
                cpu_secs_per_gib: med(&f, |r| r.cpu_secs) / (size as f64 / (1u64 << 30) as f64),
                verified: verified[k],
                runs: f,
            });
        }
    }
    Ok(TlsSummary {
        protocol: session.protocol,
        cipher_suite: session.cipher_suite,
        stream_ratio_to_tcp_loopback: ratio(stream.bytes_per_sec, link),
        stream,
        rows,
    })
}

pub(super) fn print(t: &TlsSummary, refs: &References, c: &Config) {
    println!();
    println!(
        "TLS cost ({} {}, mutual certificates), loopback TCP",
        t.protocol, t.cipher_suite
    );
    let samples: Vec<String> = t.stream.samples.iter().map(|s| gbs(*s)).collect();
    println!(
        "  {:<44}{:>6} GB/s = {:.2} x raw TCP {} GB/s   (runs: {})",
        "raw TLS stream",
        gbs(t.stream.bytes_per_sec),
        t.stream_ratio_to_tcp_loopback,
        gbs(refs.tcp_loopback.bytes_per_sec),
        samples.join(" ")
    );
    println!(
        "  idle {} incompressible guest, pre-touched destination:",
        human(c.size)
    );
    println!(
        "  {:<30}{:>7}{:>10}{:>9}{:>11}{:>10}{:>9}",
        "case", "time s", "stream", "guest", "stream", "guest", "CPU s"
    );
    println!(
        "  {:<30}{:>7}{:>10}{:>9}{:>11}{:>10}{:>9}",
        "", "", "GB/s", "GB/s", "/TCP ref", "/plain", "/GiB"
    );
    for r in &t.rows {
        println!(
            "  {:<30}{:>7.2}{:>10}{:>9}{:>11.2}{:>10.2}{:>9.2}",
            r.name,
            r.secs,
            gbs(r.stream_bytes_per_sec),
            gbs(r.guest_bytes_per_sec),
            r.stream_ratio_to_tcp_loopback,
            r.ratio_to_plain,
            r.cpu_secs_per_gib
        );
    }
}
