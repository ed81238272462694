//! `--report FILE.svg` and `livemig dirtyrate`, run as a user runs them.

use std::process::{Command, Output};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_livemig");
/// The heavy dirtier of crates/minivm/tests/converge.rs: 2 × 4 MiB written
/// as fast as the guest can, against a 4 MiB/s link.
const SCENARIO: &[&str] = &[
    "--mem",
    "64M",
    "--vcpus",
    "2",
    "--working-set",
    "4M",
    "--rate",
    "0",
    "--warmup",
    "0.5",
    "--max-bandwidth",
    "4M",
    "--quiet",
];

fn kvm_available(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            eprintln!("SKIPPED {test}: /dev/kvm is not usable here ({e})");
            false
        }
    }
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Checks the SVG is a whole document with every series and the headline.
fn check_svg(svg: &str, converged: bool) {
    assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
    assert!(svg.trim_end().ends_with("</svg>"));
    // Balanced groups: the document nests properly.
    assert_eq!(svg.matches("<g ").count(), svg.matches("</g>").count());
    for id in [
        "series-dirty-pages",
        "series-sent-pages",
        "series-remaining-pages",
        "series-throughput",
        "series-dirty-rate",
        "series-max-bandwidth",
        "series-throttle",
        "series-expected-downtime",
        "series-downtime-limit",
    ] {
        assert!(svg.contains(&format!("id=\"{id}\"")), "missing {id}");
    }
    assert!(svg.contains("<path d=\"M"), "lines are drawn");
    let headline = if converged {
        "Converged: total"
    } else {
        "Did NOT converge"
    };
    assert!(svg.contains(headline), "headline '{headline}'");
}

#[test]
fn vm_migrate_report_shows_a_migration_that_does_not_converge() {
    if !kvm_available("vm_migrate_report_shows_a_migration_that_does_not_converge") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("nohelp.svg");
    let out = Command::new(BIN)
        .arg("vm-migrate")
        .arg(format!("file:{}", dir.path().join("snap").display()))
        .args(SCENARIO)
        .args(["--cancel-after", "5", "--report"])
        .arg(&svg)
        .output()
        .unwrap();
    assert!(!out.status.success(), "cancelled: {}", text(&out));
    assert!(text(&out).contains("cancelled"), "{}", text(&out));
    let s = std::fs::read_to_string(&svg).unwrap();
    check_svg(&s, false);
    assert!(s.contains("cancelled after"));
}

#[test]
fn demo_report_with_dirty_limit_converges() {
    if !kvm_available("demo_report_with_dirty_limit_converges") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("limit.svg");
    let out = Command::new(BIN)
        .arg("demo")
        .args(SCENARIO)
        .args(["--seconds-after", "1", "--dirty-track", "ring"])
        .args(["--dirty-limit", "256K", "--cancel-after", "30", "--report"])
        .arg(&svg)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let s = std::fs::read_to_string(&svg).unwrap();
    check_svg(&s, true);
    assert!(s.contains("id=\"series-dirty-limit\""));
    assert!(s.contains("dirty-limit 256.0 KiB/s per vCPU"));
}

#[test]
fn dirty_limit_without_the_ring_is_refused() {
    let out = Command::new(BIN)
        .args(["vm-migrate", "file:/nonexistent/x", "--dirty-limit", "1M"])
        .args(["--dirty-track", "manual"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--dirty-track ring"),
        "{}",
        text(&out)
    );
}

#[test]
fn dirtyrate_json_reports_overall_and_per_vcpu_rates() {
    if !kvm_available("dirtyrate_json_reports_overall_and_per_vcpu_rates") {
        return;
    }
    let out = Command::new(BIN)
        .args(["dirtyrate", "--mem", "64M", "--vcpus", "2"])
        .args(["--working-set", "4M", "--seconds", "2", "--warmup", "0.3"])
        .arg("--json")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let v: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(v["tracker"], "kvm-ring");
    assert_eq!(v["per-vcpu"], true);
    assert_eq!(v["self-check"], "passed");
    assert_eq!(v["samples"].as_array().unwrap().len(), 2);
    // The guest rewrites its 2 × 1024 pages over and over: each one-second
    // sample sees (nearly) all of them dirty, and each vCPU about half.
    let rate = v["dirty-pages-rate"].as_u64().unwrap();
    assert!((1500..=2200).contains(&rate), "{v}");
    for c in v["vcpus"].as_array().unwrap() {
        let r = c["dirty-pages-rate"].as_u64().unwrap();
        assert!((700..=1200).contains(&r), "{v}");
    }

    // Without the ring: the overall rate only.
    let out = Command::new(BIN)
        .args(["dirtyrate", "--mem", "64M", "--vcpus", "2"])
        .args(["--working-set", "4M", "--seconds", "1", "--warmup", "0.3"])
        .args(["--dirty-track", "bitmap", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["per-vcpu"], false);
    assert!(v["dirty-pages-rate"].as_u64().unwrap() > 1000, "{v}");
    assert!(v["vcpus"][0]["dirty-pages-rate"].is_null());
}

/// The points of series `id`: its path's coordinates, in SVG units.
fn series_points(svg: &str, id: &str) -> Vec<(f64, f64)> {
    let at = svg
        .find(&format!("<g id=\"series-{id}\""))
        .unwrap_or_else(|| panic!("no series {id}"));
    let group = &svg[at..at + svg[at..].find("</g>").unwrap()];
    let d = group
        .split("<path d=\"")
        .nth(1)
        .and_then(|p| p.split('"').next())
        .unwrap_or_else(|| panic!("series {id} has no line: {group}"));
    d.split(['M', 'L'])
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (x, y) = p.split_once(',').unwrap();
            (x.parse().unwrap(), y.parse().unwrap())
        })
        .collect()
}

/// The value of attribute `name` in the first element with `anchor`.
fn attr(svg: &str, anchor: &str, name: &str) -> String {
    let at = svg.find(anchor).unwrap_or_else(|| panic!("no {anchor}"));
    let el = &svg[at..at + svg[at..].find('>').unwrap()];
    let v = el.split(&format!("{name}=\"")).nth(1).unwrap();
    v[..v.find('"').unwrap()].to_string()
}

#[test]
fn demo_postcopy_report_shows_the_postcopy_phase() {
    if !kvm_available("demo_postcopy_report_shows_the_postcopy_phase") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("postcopy.svg");
    // The heavy dirtier's 8 MiB working set takes ~250 ms at 32 MiB/s:
    // under a 300 ms limit precopy may converge (it did once in CI), under
    // 50 ms it cannot, so auto postcopy switches.
    let mut args = SCENARIO.to_vec();
    let bw = args.iter().position(|a| *a == "--max-bandwidth").unwrap();
    args[bw + 1] = "32M";
    args.retain(|a| *a != "--quiet");
    let out = Command::new(BIN)
        .arg("demo")
        .args(&args)
        .args(["--postcopy", "--downtime-limit", "50"])
        .args(["--seconds-after", "0.5", "--json"])
        .args(["--cancel-after", "60", "--report"])
        .arg(&svg)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let v: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let stats = if v["stats"].is_object() {
        &v["stats"]
    } else {
        &v
    };
    assert!(stats["postcopy-time"].is_u64(), "switched: {stats}");
    let s = std::fs::read_to_string(&svg).unwrap();
    check_svg(&s, true);
    assert!(
        s.contains("switched to postcopy at"),
        "the subtitle says so"
    );
    // Pages pushed and asked for, cumulative: a line of at least two
    // points, left to right, never going down (SVG y grows downwards).
    let mut total_top = f64::MAX;
    for id in ["pushed-pages", "requested-pages"] {
        let pts = series_points(&s, id);
        assert!(pts.len() >= 2, "{id}: {pts:?}");
        for w in pts.windows(2) {
            assert!(w[1].0 >= w[0].0 && w[1].1 <= w[0].1 + 1e-6, "{id}: {w:?}");
        }
        total_top = total_top.min(pts.last().unwrap().1);
    }
    // Something moved after the switch: the higher line ends above its
    // start.
    let starts = series_points(&s, "pushed-pages")[0].1;
    assert!(total_top < starts, "no page after the switch");
    // The fault figures match the stats, and the histogram bars add up to
    // the faults.
    let bt: u64 = attr(&s, "id=\"postcopy-blocktime\"", "data-blocktime-ms")
        .parse()
        .unwrap();
    assert_eq!(bt, stats["postcopy-blocktime"].as_u64().unwrap());
    let faults: u64 = attr(&s, "id=\"postcopy-blocktime\"", "data-faults")
        .parse()
        .unwrap();
    let dist: Vec<u64> = stats["postcopy-latency-dist"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_u64().unwrap())
        .collect();
    assert_eq!(faults, dist.iter().sum::<u64>());
    let bars: u64 = s
        .split("class=\"latency-bucket\"")
        .skip(1)
        .map(|b| attr(b, "data-count", "data-count").parse::<u64>().unwrap())
        .sum();
    assert_eq!(bars, faults);
    let p99 = stats["postcopy-latency-p99"].as_u64().unwrap();
    assert!(s.contains(&format!("p99 {p99} us")));
}
