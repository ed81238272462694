//! The table (terminal and Markdown) and the BENCHMARKS.md section.

use serde::Serialize;

use crate::run::{Case, Outcome};

/// The default section name (`--section`).
pub const DEFAULT_SECTION: &str = "qemu-comparison";

/// The marker comments around section `name` of BENCHMARKS.md.
pub fn markers(name: &str) -> (String, String) {
    (
        format!("<!-- {name}:begin -->"),
        format!("<!-- {name}:end -->"),
    )
}

/// One run: a case and what one system did with it.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// The case.
    pub case: Case,
    /// Which repetition (0-based).
    pub rep: u32,
    /// The outcome.
    pub outcome: Outcome,
}

/// Where the run happened.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Machine {
    /// CPU model name.
    pub cpu: String,
    /// Online CPUs.
    pub cores: usize,
    /// Memory in bytes.
    pub memory: u64,
    /// Kernel release.
    pub kernel: String,
    /// `qemu-system-x86_64 --version`, first line.
    pub qemu: String,
    /// UTC date and time of the run.
    pub date: String,
    /// memcpy bandwidth, bytes/s (livemig bench reference, same run).
    pub memcpy: f64,
    /// Loopback TCP throughput, bytes/s (same).
    pub tcp: f64,
    /// The network both systems used (loopback or the shaped link).
    pub network: String,
    /// Runs per case and system.
    pub reps: u32,
    /// Load averages at the start and end of the run.
    pub load: String,
}

/// Median, minimum and maximum of some runs' figure.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Stat {
    /// Median (mean of the middle two for an even count).
    pub median: f64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
    /// How many runs it is over.
    pub n: usize,
}

impl Stat {
    /// The statistic of `v`; None when empty.
    pub fn of(v: &[f64]) -> Option<Stat> {
        if v.is_empty() {
            return None;
        }
        let mut s = v.to_vec();
        s.sort_by(|a, b| a.total_cmp(b));
        let n = s.len();
        let median = if n % 2 == 1 {
            s[n / 2]
        } else {
            (s[n / 2 - 1] + s[n / 2]) / 2.0
        };
        Some(Stat {
            median,
            min: s[0],
            max: s[n - 1],
            n,
        })
    }

    fn show(&self, prec: usize) -> String {
        if self.n > 1 && self.min != self.max {
            format!(
                "{:.p$} ({:.p$}-{:.p$})",
                self.median,
                self.min,
                self.max,
                p = prec
            )
        } else {
            format!("{:.p$}", self.median, p = prec)
        }
    }
}

/// The runs of one case on one system, summarised.
#[derive(Clone, Debug, Serialize)]
pub struct Agg {
    /// The case.
    pub case: Case,
    /// "qemu" or "livemig".
    pub system: String,
    /// Runs made.
    pub runs: usize,
    /// False when this system does not offer the variant.
    pub ran: bool,
    /// Runs that completed within the budget.
    pub completed: usize,
    /// Runs that ended in an error (not a result).
    pub errors: usize,
    /// Total time over the runs without error (a cancelled run counts its
    /// budget), ms.
    pub total_ms: Option<Stat>,
    /// Downtime over the completed runs, ms.
    pub downtime_ms: Option<Stat>,
    /// Bytes sent, MiB (runs without error).
    pub sent_mib: Option<Stat>,
    /// Average rate, MB/s (bytes / total time).
    pub avg_mbs: Option<Stat>,
    /// Dirty syncs.
    pub dirty_syncs: Option<Stat>,
    /// Highest throttle seen, %.
    pub throttle_pct: Option<Stat>,
    /// Postcopy blocktime, ms (completed runs that report it).
    pub blocktime_ms: Option<Stat>,
    /// Postcopy highest per-vCPU blocktime, ms.
    pub vcpu_blocktime_ms: Option<Stat>,
    /// Postcopy fault latency p50, µs.
    pub fault_p50_us: Option<Stat>,
    /// Postcopy fault latency p99, µs.
    pub fault_p99_us: Option<Stat>,
    /// Incrementer: its speed during the migration, % of its speed just
    /// before (runs that measured it).
    pub guest_speed_pct: Option<Stat>,
    /// The source's vCPU thread on a CPU during the migration, % of the
    /// wall time.
    pub vcpu_run_pct: Option<Stat>,
    /// Its other threads on a CPU during the migration, %.
    pub others_pct: Option<Stat>,
    /// Destination checks passed / failed.
    pub checks_passed: usize,
    /// See `checks_passed`.
    pub checks_failed: usize,
}

/// Groups `rows` by case and system (in the order first seen).
pub fn aggregate(rows: &[Row]) -> Vec<Agg> {
    let mut keys: Vec<(String, String, String)> = Vec::new();
    for r in rows {
        let k = (
            r.case.scenario.clone(),
            r.case.variant_label(),
            r.outcome.system.clone(),
        );
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    keys.into_iter()
        .map(|k| {
            let g: Vec<&Row> = rows
                .iter()
                .filter(|r| {
                    r.case.scenario == k.0
                        && r.case.variant_label() == k.1
                        && r.outcome.system == k.2
                })
                .collect();
            let ok: Vec<&Outcome> = g
                .iter()
                .map(|r| &r.outcome)
                .filter(|o| o.ran && o.status != "error")
                .collect();
            let done: Vec<&Outcome> = ok.iter().copied().filter(|o| o.converged).collect();
            let st = |v: &[&Outcome], f: &dyn Fn(&Outcome) -> Option<f64>| {
                Stat::of(&v.iter().filter_map(|o| f(o)).collect::<Vec<_>>())
            };
            Agg {
                case: g[0].case.clone(),
                system: k.2,
                runs: g.len(),
                ran: g.iter().any(|r| r.outcome.ran),
                completed: done.len(),
                errors: g
                    .iter()
                    .filter(|r| r.outcome.ran && r.outcome.status == "error")
                    .count(),
                total_ms: st(&ok, &|o| Some(o.total_ms as f64)),
                downtime_ms: st(&done, &|o| Some(o.downtime_ms as f64)),
                sent_mib: st(&ok, &|o| Some(o.bytes as f64 / (1u64 << 20) as f64)),
                avg_mbs: st(&ok, &|o| {
                    (o.total_ms > 0).then(|| o.bytes as f64 / 1e6 / (o.total_ms as f64 / 1e3))
                }),
                dirty_syncs: st(&ok, &|o| Some(o.dirty_syncs as f64)),
                throttle_pct: st(&ok, &|o| Some(o.throttle_pct as f64)),
                blocktime_ms: st(&done, &|o| o.blocktime_ms.map(|v| v as f64)),
                vcpu_blocktime_ms: st(&done, &|o| o.vcpu_blocktime_ms.map(|v| v as f64)),
                fault_p50_us: st(&done, &|o| o.fault_p50_us.map(|v| v as f64)),
                fault_p99_us: st(&done, &|o| o.fault_p99_us.map(|v| v as f64)),
                guest_speed_pct: st(&ok, &|o| o.guest_speed_pct),
                vcpu_run_pct: st(&ok, &|o| o.cpu_during.map(|w| w.vcpu_run_pct)),
                others_pct: st(&ok, &|o| o.cpu_during.map(|w| w.others_pct)),
                checks_passed: g
                    .iter()
                    .filter(|r| r.outcome.check.as_ref().is_some_and(|c| c.ok))
                    .count(),
                checks_failed: g
                    .iter()
                    .filter(|r| r.outcome.check.as_ref().is_some_and(|c| !c.ok))
                    .count(),
            }
        })
        .collect()
}

fn cells(a: &Agg) -> Vec<String> {
    let ok_runs = a.runs - a.errors;
    let conv = if !a.ran {
        "n/a".to_string()
    } else if ok_runs == 0 {
        "ERROR".into()
    } else if a.completed == a.runs {
        format!("yes {}/{}", a.completed, a.runs)
    } else {
        format!("NO {}/{}", a.completed, a.runs)
    };
    let s = |v: &Option<Stat>, p: usize| v.map(|v| v.show(p)).unwrap_or_else(|| "-".into());
    let check = if !a.ran {
        "n/a".to_string()
    } else if a.checks_failed > 0 {
        format!("FAIL {}/{}", a.checks_failed, a.runs)
    } else if a.checks_passed > 0 {
        format!("pass {}/{}", a.checks_passed, a.runs)
    } else {
        "-".into()
    };
    let lat = match (a.fault_p50_us, a.fault_p99_us) {
        (Some(p50), Some(p99)) => format!("{:.0} / {:.0}", p50.median, p99.median),
        _ => "-".into(),
    };
    vec![
        a.case.scenario.clone(),
        a.case.variant_label(),
        a.system.clone(),
        conv,
        s(&a.total_ms, 0),
        s(&a.downtime_ms, 0),
        s(&a.sent_mib, 0),
        s(&a.avg_mbs, 0),
        s(&a.dirty_syncs, 0),
        s(&a.throttle_pct, 0),
        s(&a.blocktime_ms, 0),
        lat,
        s(&a.guest_speed_pct, 0),
        s(&a.vcpu_run_pct, 0),
        s(&a.others_pct, 0),
        check,
    ]
}

const HEAD: [&str; 16] = [
    "scenario",
    "variant",
    "system",
    "completed",
    "total ms",
    "downtime ms",
    "sent MiB",
    "MB/s (avg)",
    "dirty syncs",
    "max throttle %",
    "blocktime ms",
    "fault p50/p99 µs",
    "guest speed %",
    "vCPU CPU %",
    "migration CPU %",
    "check",
];

/// The table for a terminal, then one line per note (failures, n/a).
pub fn text_table(aggs: &[Agg], rows: &[Row]) -> String {
    let body: Vec<Vec<String>> = aggs.iter().map(cells).collect();
    let mut w: Vec<usize> = HEAD.iter().map(|h| h.chars().count()).collect();
    for r in &body {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |r: &[String]| {
        r.iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut s = line(&HEAD.map(String::from)) + "\n";
    for r in &body {
        s += &(line(r) + "\n");
    }
    s + &notes(rows)
}

/// One line per scenario whose settings differ from the common ones
/// (a bandwidth cap, a warm-up, its own budget).
fn scenario_notes(rows: &[Row]) -> String {
    let mut s = String::new();
    let mut seen: Vec<&str> = Vec::new();
    for r in rows {
        let c = &r.case;
        if !c.warm_up || seen.contains(&c.scenario.as_str()) {
            continue;
        }
        seen.push(&c.scenario);
        s += &format!(
            "- {}: max-bandwidth {} MiB/s on both systems, {} s budget per migration; \
             migrated once the guest has written every page (its first full pass); \
             \"max throttle %\" is the highest `cpu-throttle-percentage` query-migrate \
             showed during the migration\n",
            c.scenario,
            c.max_bandwidth >> 20,
            c.budget.as_secs()
        );
    }
    s
}

fn notes(rows: &[Row]) -> String {
    let mut s = scenario_notes(rows);
    if rows.iter().any(|r| r.outcome.guest_speed.is_some()) {
        s += "- guest speed %: the incrementer's passes per second during the migration \
              over its rate in the passes just before it (pass ends timed on the source's \
              serial port; a completed run ends where the writer stood in the source's \
              final memory, a cancelled one at its last pass end before the cancel); vCPU CPU %: \
              the source's vCPU thread on a CPU during the migration, % of the wall time; \
              migration CPU %: the source VMM's other threads (the migration's)\n";
    }
    for r in rows {
        let o = &r.outcome;
        let mut parts = Vec::new();
        if let Some(g) = &o.guest_speed {
            let per_cpu = match (&o.cpu_before, &o.cpu_during) {
                (Some(b), Some(d)) if b.vcpu_run_pct > 0.0 && d.vcpu_run_pct > 0.0 => format!(
                    " ({:.2} and {:.2} per vCPU CPU-second)",
                    g.before_pps * 100.0 / b.vcpu_run_pct,
                    g.during_pps * 100.0 / d.vcpu_run_pct
                ),
                _ => String::new(),
            };
            parts.push(format!(
                "guest {:.2} passes/s before, {:.2} during{per_cpu}",
                g.before_pps, g.during_pps
            ));
        }
        let cpu = |w: &crate::cpu::Window| {
            format!(
                "vCPU {:.0}% on a CPU, {:.0}% waiting for one, other threads {:.0}%",
                w.vcpu_run_pct, w.vcpu_wait_pct, w.others_pct
            )
        };
        match (&o.cpu_before, &o.cpu_during) {
            (Some(b), Some(d)) => parts.push(format!("before: {}; during: {}", cpu(b), cpu(d))),
            (None, Some(d)) => parts.push(format!("during: {}", cpu(d))),
            _ => {}
        }
        if let Some(c) = &o.check {
            parts.push(format!("check: {}", c.detail));
        }
        if !o.note.is_empty() {
            parts.push(o.note.clone());
        }
        if !parts.is_empty() {
            s += &format!(
                "- {} / {} / {} run {}: {}\n",
                r.case.scenario,
                r.case.variant_label(),
                o.system,
                r.rep + 1,
                parts.join("; ")
            );
        }
    }
    s
}

/// The table in Markdown, then the notes as a list.
pub fn markdown_table(aggs: &[Agg], rows: &[Row]) -> String {
    let mut s = format!("| {} |\n", HEAD.join(" | "));
    s += &format!(
        "|{}|\n",
        HEAD.iter()
            .enumerate()
            .map(|(i, _)| if i < 3 { "---" } else { "---:" })
            .collect::<Vec<_>>()
            .join("|")
    );
    for a in aggs {
        s += &format!("| {} |\n", cells(a).join(" | "));
    }
    s + "\n" + &notes(rows)
}

/// The generated BENCHMARKS.md section (between the markers).
pub fn section(aggs: &[Agg], rows: &[Row], m: &Machine, command: &str, name: &str) -> String {
    let (begin, end) = markers(name);
    format!(
        "{begin}\n\
         _Generated by `{command}` on {date}; do not edit by hand between these markers._\n\n\
         Machine: {cpu}, {cores} cores, {mem} GiB, Linux {kernel}, {qemu}. Same run: memcpy \
         {memcpy:.2} GB/s, loopback TCP {tcp:.2} GB/s (`livemig bench` references). \
         Network: {network}. {reps} run(s) per case and system, the systems interleaved; \
         figures are medians (min-max). Load average (1, 5, 15 min): {load}.\n\n\
         {table}\n{end}",
        date = m.date,
        cpu = m.cpu,
        cores = m.cores,
        mem = m.memory >> 30,
        kernel = m.kernel,
        qemu = m.qemu,
        memcpy = m.memcpy / 1e9,
        tcp = m.tcp / 1e9,
        network = m.network,
        reps = m.reps,
        load = m.load,
        table = markdown_table(aggs, rows),
    )
}

/// Replaces the text between section `name`'s markers in `doc` with `section`
/// (which carries the markers); appends it when the markers are absent.
pub fn replace_section(doc: &str, section: &str, name: &str) -> Result<String, String> {
    let (begin, end) = markers(name);
    match (doc.find(&begin), doc.find(&end)) {
        (Some(b), Some(e)) if b < e => {
            Ok(format!("{}{}{}", &doc[..b], section, &doc[e + end.len()..]))
        }
        (None, None) => {
            let sep = if doc.ends_with('\n') { "\n" } else { "\n\n" };
            Ok(format!("{doc}{sep}{section}\n"))
        }
        _ => Err(format!(
            "the markers {begin} and {end} are not both present, in that order"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::{CheckResult, GuestKind};
    use crate::run::Variant;
    use std::time::Duration;

    fn row(system: &str, rep: u32, converged: bool, ok: Option<bool>, total: u64) -> Row {
        Row {
            case: Case {
                scenario: "incrementer-1G-30ms".into(),
                guest: GuestKind::Incrementer,
                mem: 1 << 30,
                end: 1 << 30,
                downtime_ms: 30,
                variant: Variant::Xbzrle,
                seed: 1,
                xbzrle_cache: 64 << 20,
                max_bandwidth: 1 << 40,
                budget: Duration::from_secs(30),
                boot_budget: Duration::from_secs(60),
                warm_up: false,
                throttle_steps: None,
            },
            rep,
            outcome: Outcome {
                system: system.into(),
                ran: true,
                status: if converged { "completed" } else { "cancelled" }.into(),
                converged,
                total_ms: total,
                downtime_ms: total / 100,
                bytes: 3 << 29,
                dirty_syncs: 4,
                throttle_pct: 40,
                check: ok.map(|ok| CheckResult {
                    ok,
                    detail: if ok {
                        "fine".into()
                    } else {
                        "page 0x1000 stale".into()
                    },
                }),
                ..Default::default()
            },
        }
    }

    #[test]
    fn stat_is_median_min_max() {
        let s = Stat::of(&[5.0, 1.0, 3.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (3.0, 1.0, 5.0, 3));
        assert_eq!(Stat::of(&[4.0, 1.0, 2.0, 3.0]).unwrap().median, 2.5);
        assert!(Stat::of(&[]).is_none());
        assert_eq!(s.show(0), "3 (1-5)");
        assert_eq!(Stat::of(&[7.0]).unwrap().show(0), "7");
    }

    #[test]
    fn guest_speed_and_cpu_shares_show_in_the_table_and_the_notes() {
        use crate::cpu::Window;
        use crate::progress::GuestSpeed;
        let mut rows = vec![row("livemig", 0, true, Some(true), 1000)];
        for (i, (pct, run)) in [(50.0, 20.0), (80.0, 30.0)].into_iter().enumerate() {
            let mut r = row("livemig", i as u32 + 1, true, Some(true), 1000);
            r.outcome.guest_speed = Some(GuestSpeed {
                before_pps: 0.6,
                during_pps: 0.6 * pct / 100.0,
            });
            r.outcome.guest_speed_pct = Some(pct);
            r.outcome.cpu_before = Some(Window {
                vcpu_run_pct: 40.0,
                vcpu_wait_pct: 55.0,
                others_pct: 1.0,
            });
            r.outcome.cpu_during = Some(Window {
                vcpu_run_pct: run,
                vcpu_wait_pct: 100.0 - run,
                others_pct: 12.0,
            });
            rows.push(r);
        }
        let aggs = aggregate(&rows);
        let a = &aggs[0];
        // The run without figures does not count in their medians.
        assert_eq!(a.guest_speed_pct.unwrap().n, 2);
        assert_eq!(a.guest_speed_pct.unwrap().median, 65.0);
        assert_eq!(a.vcpu_run_pct.unwrap().median, 25.0);
        let t = markdown_table(&aggs, &rows);
        assert!(
            t.contains("| guest speed % | vCPU CPU % | migration CPU % |"),
            "{t}"
        );
        assert!(t.contains("| 65 (50-80) | 25 (20-30) | 12 |"), "{t}");
        assert!(
            t.contains(
                "guest 0.60 passes/s before, 0.30 during (1.50 and 1.50 per vCPU CPU-second); \
                 before: vCPU 40% on a CPU, 55% waiting for one, other threads 1%; \
                 during: vCPU 20% on a CPU, 80% waiting for one"
            ),
            "{t}"
        );
        assert!(
            t.contains("- guest speed %: the incrementer's passes per second"),
            "{t}"
        );
        // Without any figure there is no explanation line.
        let plain = markdown_table(&aggregate(&rows[..1]), &rows[..1]);
        assert!(!plain.contains("- guest speed %"), "{plain}");
    }

    #[test]
    fn runs_are_aggregated_per_case_and_system() {
        let rows = vec![
            row("qemu", 0, true, Some(true), 3000),
            row("livemig", 0, true, Some(true), 1000),
            row("qemu", 1, true, Some(false), 1000),
            row("livemig", 1, false, None, 30000),
            row("qemu", 2, true, Some(true), 2000),
            row("livemig", 2, true, Some(true), 2000),
        ];
        let aggs = aggregate(&rows);
        assert_eq!(aggs.len(), 2);
        let q = &aggs[0];
        assert_eq!((q.system.as_str(), q.runs, q.completed), ("qemu", 3, 3));
        assert_eq!(q.total_ms.unwrap().median, 2000.0);
        assert_eq!((q.checks_passed, q.checks_failed), (2, 1));
        let l = &aggs[1];
        assert_eq!(l.completed, 2);
        // Downtime over the completed runs only; total over every run.
        assert_eq!(l.downtime_ms.unwrap().n, 2);
        assert_eq!(l.total_ms.unwrap().max, 30000.0);
        let t = text_table(&aggs, &rows);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("scenario") && lines[0].ends_with("check"));
        assert!(lines[1].contains("yes 3/3") && lines[1].contains("2000 (1000-3000)"));
        assert!(lines[1].ends_with("FAIL 1/3"), "{}", lines[1]);
        assert!(lines[2].contains("NO 2/3") && lines[2].ends_with("pass 2/3"));
        assert!(t.contains("run 2: check: page 0x1000 stale"), "{t}");
        let md = markdown_table(&aggs, &rows);
        assert!(md.starts_with("| scenario | variant |"));
        assert_eq!(md.lines().filter(|l| l.starts_with("| incr")).count(), 2);
    }

    #[test]
    fn section_is_replaced_between_markers_only() {
        let (b, e) = markers("qemu-comparison-1gbit");
        assert_eq!(b, "<!-- qemu-comparison-1gbit:begin -->");
        let name = "qemu-comparison-1gbit";
        let doc = format!("# B\n\nbefore\n{b}\nold table\n{e}\nafter\n");
        let new = format!("{b}\nnew\n{e}");
        let out = replace_section(&doc, &new, name).unwrap();
        assert_eq!(out, format!("# B\n\nbefore\n{b}\nnew\n{e}\nafter\n"));
        assert_eq!(replace_section(&out, &new, name).unwrap(), out);
        // Another section's markers are left alone: appended instead.
        let other = replace_section(&out, "<!-- x:begin -->\ny\n<!-- x:end -->", "x").unwrap();
        assert!(other.starts_with(&out) && other.ends_with("<!-- x:end -->\n"));
        assert!(replace_section(&format!("x {e} y {b}"), &new, name).is_err());
        assert!(replace_section(&format!("x {b} y"), &new, name).is_err());
    }

    #[test]
    fn section_names_the_machine_network_reps_and_load() {
        let m = Machine {
            cpu: "Xeon".into(),
            cores: 2,
            memory: 24 << 30,
            kernel: "6.18".into(),
            qemu: "QEMU emulator version 7.2.22".into(),
            date: "2026-11-22 16:00 UTC".into(),
            memcpy: 10e9,
            tcp: 3e9,
            network: "loopback (no shaping)".into(),
            reps: 3,
            load: "7.1 6.0 5.0 at the start".into(),
        };
        let rows = [row("qemu", 0, true, Some(true), 1000)];
        let s = section(
            &aggregate(&rows),
            &rows,
            &m,
            "livemig-harness",
            DEFAULT_SECTION,
        );
        let (b, e) = markers(DEFAULT_SECTION);
        assert!(s.starts_with(&b) && s.ends_with(&e));
        for want in [
            "Xeon",
            "2 cores",
            "24 GiB",
            "6.18",
            "7.2.22",
            "2026-11-22",
            "10.00 GB/s",
            "3.00 GB/s",
            "loopback",
            "3 run(s)",
            "7.1 6.0 5.0",
        ] {
            assert!(s.contains(want), "{want} missing: {s}");
        }
        let svgs = crate::svg::charts(&aggregate(&rows), &m);
        assert_eq!(svgs.len(), 1);
        assert!(svgs[0].1.starts_with("<svg") && svgs[0].1.contains("downtime"));
        assert_eq!(
            crate::svg::file_stem("incrementer-1G-30ms", &m),
            "incrementer-1G-30ms-loopback"
        );
    }
}
