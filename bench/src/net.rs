//! Where the two sides of a migration talk: loopback (default), or two
//! network namespaces this harness creates, joined by a veth pair whose
//! both ends are shaped with a `tbf` qdisc to the link rate (`--link`).
//! Only namespaces and interfaces created here are touched; they are
//! deleted on drop and on SIGINT/SIGTERM (see `cleanup`).

use std::process::Command;
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};

use crate::cleanup;

/// The source's namespace address.
const SRC_ADDR: &str = "10.213.0.1";
/// The destination's namespace address.
const DST_ADDR: &str = "10.213.0.2";

/// An emulated link: two namespaces and their veth pair.
#[derive(Debug)]
pub struct Link {
    /// Rate in bits/s.
    pub rate_bits: u64,
    /// The rate as given (e.g. "1gbit").
    pub label: String,
    src_ns: String,
    dst_ns: String,
}

static LINK: OnceLock<Link> = OnceLock::new();

/// Parses a rate like `1gbit`, `10gbit`, `500mbit` into bits/s.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let l = s.to_ascii_lowercase();
    let (n, mul) = [
        ("gbit", 1_000_000_000u64),
        ("mbit", 1_000_000),
        ("kbit", 1_000),
    ]
    .iter()
    .find_map(|(suf, m)| l.strip_suffix(suf).map(|n| (n.to_string(), *m)))
    .ok_or_else(|| format!("'{s}': a rate like 1gbit, 10gbit or 500mbit"))?;
    let v: f64 = n
        .parse()
        .map_err(|_| format!("'{s}': a rate like 1gbit, 10gbit or 500mbit"))?;
    let bits = (v * mul as f64) as u64;
    if !(1_000_000..=100_000_000_000).contains(&bits) {
        return Err(format!("'{s}': from 1mbit to 100gbit"));
    }
    Ok(bits)
}

/// tbf's bucket in bytes: 4 ms of the rate, at least 64 KiB (one GSO
/// packet on a veth).
pub fn burst_bytes(rate_bits: u64) -> u64 {
    (rate_bits / 8 / 250).max(64 << 10)
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Deletes a namespace this harness created (its veth end goes with it).
pub fn delete_namespace(name: &str) {
    let _ = Command::new("ip").args(["netns", "del", name]).output();
}

/// Creates the link (once per run) and makes it the one every side uses.
pub fn setup(rate_bits: u64, label: &str) -> Result<&'static Link> {
    let id = std::process::id();
    let (src_ns, dst_ns) = (format!("lmh-{id}-src"), format!("lmh-{id}-dst"));
    let (src_if, dst_if) = (format!("lmh{id}s"), format!("lmh{id}d"));
    let link = Link {
        rate_bits,
        label: label.to_string(),
        src_ns: src_ns.clone(),
        dst_ns: dst_ns.clone(),
    };
    for ns in [&src_ns, &dst_ns] {
        ip(&["netns", "add", ns])?;
        cleanup::add_namespace(ns);
    }
    let r = (|| -> Result<()> {
        ip(&[
            "link", "add", &src_if, "netns", &src_ns, "type", "veth", "peer", "name", &dst_if,
            "netns", &dst_ns,
        ])?;
        let rate = format!("{rate_bits}bit");
        let burst = burst_bytes(rate_bits).to_string();
        for (ns, dev, addr) in [(&src_ns, &src_if, SRC_ADDR), (&dst_ns, &dst_if, DST_ADDR)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", "dev", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "dev", "lo", "up"])?;
            let out = Command::new("ip")
                .args([
                    "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                ])
                .args(["rate", &rate, "burst", &burst, "latency", "20ms"])
                .output()
                .context("running tc")?;
            if !out.status.success() {
                bail!(
                    "tc qdisc add dev {dev} root tbf rate {rate} in {ns} failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
        Ok(())
    })();
    if let Err(e) = r {
        teardown_ns(&link);
        return Err(e);
    }
    LINK.set(link)
        .map_err(|_| anyhow::anyhow!("the link is set up once per run"))?;
    Ok(LINK.get().expect("just set"))
}

fn teardown_ns(l: &Link) {
    for ns in [&l.src_ns, &l.dst_ns] {
        delete_namespace(ns);
        cleanup::remove_namespace(ns);
    }
}

/// Deletes the link's namespaces (end of the run).
pub fn teardown() {
    if let Some(l) = LINK.get() {
        teardown_ns(l);
    }
}

/// Which side of the migration a process belongs to.
#[derive(Clone, Copy, Debug)]
pub enum Side {
    /// The migration source.
    Src,
    /// The destination.
    Dst,
}

/// A command running `program` on `side`: inside that side's namespace
/// with `--link`, directly on loopback.
pub fn command(side: Side, program: impl AsRef<std::ffi::OsStr>) -> Command {
    match LINK.get() {
        None => Command::new(program),
        Some(l) => {
            let ns = match side {
                Side::Src => &l.src_ns,
                Side::Dst => &l.dst_ns,
            };
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(program);
            c
        }
    }
}

/// The address the destination listens on.
pub fn dest_addr() -> &'static str {
    if LINK.get().is_some() {
        DST_ADDR
    } else {
        "127.0.0.1"
    }
}

/// What the run's network was, for the table's header.
pub fn describe() -> String {
    match LINK.get() {
        None => "loopback (no shaping)".into(),
        Some(l) => format!(
            "two network namespaces joined by a veth pair, both ends shaped by tbf to {} \
             (burst {} KiB, latency 20 ms)",
            l.label,
            burst_bytes(l.rate_bits) >> 10
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_and_bad_ones_are_named() {
        assert_eq!(parse_rate("1gbit"), Ok(1_000_000_000));
        assert_eq!(parse_rate("10Gbit"), Ok(10_000_000_000));
        assert_eq!(parse_rate("500mbit"), Ok(500_000_000));
        assert_eq!(parse_rate("2.5gbit"), Ok(2_500_000_000));
        assert!(parse_rate("1gb").unwrap_err().contains("'1gb'"));
        assert!(parse_rate("10kbit").unwrap_err().contains("from 1mbit"));
        assert_eq!(burst_bytes(1_000_000_000), 500_000);
        assert_eq!(burst_bytes(10_000_000), 64 << 10);
    }

    #[test]
    fn loopback_is_the_default() {
        assert_eq!(dest_addr(), "127.0.0.1");
        let c = command(Side::Src, "qemu-system-x86_64");
        assert_eq!(c.get_program(), "qemu-system-x86_64");
    }
}
