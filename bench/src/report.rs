//! The table (terminal and Markdown) and the BENCHMARKS.md section.

use serde::Serialize;

use crate::run::{Case, Outcome};

/// Marker comments around the generated section of BENCHMARKS.md.
pub const BEGIN: &str = "<!-- qemu-comparison:begin -->";
/// See [`BEGIN`].
pub const END: &str = "<!-- qemu-comparison:end -->";

/// One row: a case and what one system did with it.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// The case.
    pub case: Case,
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
}

fn cells(r: &Row) -> Vec<String> {
    let o = &r.outcome;
    let na = !o.ran || o.status == "error";
    let conv = if !o.ran {
        "n/a".to_string()
    } else if o.converged {
        "yes".into()
    } else if o.status == "error" {
        "ERROR".into()
    } else {
        "NO".into()
    };
    let num = |v: String| if na { "-".into() } else { v };
    let check = match &o.check {
        Some(c) if c.ok => "pass".to_string(),
        Some(_) => "FAIL".into(),
        None if !o.ran => "n/a".into(),
        None => "-".into(),
    };
    vec![
        r.case.scenario.clone(),
        r.case.variant_label(),
        o.system.clone(),
        conv,
        num(o.total_ms.to_string()),
        // A migration that did not complete had no downtime.
        if na || !o.converged {
            "-".into()
        } else {
            o.downtime_ms.to_string()
        },
        num(o.setup_ms.to_string()),
        num(format!("{:.1}", o.bytes as f64 / (1u64 << 20) as f64)),
        num(format!("{:.0}", o.mbps / 8.0)),
        num(if o.total_ms > 0 {
            format!("{:.0}", o.bytes as f64 / 1e6 / (o.total_ms as f64 / 1e3))
        } else {
            "-".into()
        }),
        num(o.dirty_syncs.to_string()),
        num(o.throttle_pct.to_string()),
        check,
    ]
}

const HEAD: [&str; 13] = [
    "scenario",
    "variant",
    "system",
    "converged",
    "total ms",
    "downtime ms",
    "setup ms",
    "sent MiB",
    "MB/s (mbps/8)",
    "MB/s (avg)",
    "dirty syncs",
    "max throttle %",
    "check",
];

/// The table for a terminal, then one line per note (failures, n/a).
pub fn text_table(rows: &[Row]) -> String {
    let body: Vec<Vec<String>> = rows.iter().map(cells).collect();
    let mut w: Vec<usize> = HEAD.iter().map(|h| h.len()).collect();
    for r in &body {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
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
    for r in rows {
        let o = &r.outcome;
        let mut parts = Vec::new();
        if let Some(c) = &o.check {
            parts.push(format!("check: {}", c.detail));
        }
        if !o.note.is_empty() {
            parts.push(o.note.clone());
        }
        if !parts.is_empty() {
            s += &format!(
                "- {} / {} / {}: {}\n",
                r.case.scenario,
                r.case.variant_label(),
                o.system,
                parts.join("; ")
            );
        }
    }
    s
}

/// The table in Markdown, then the notes as a list.
pub fn markdown_table(rows: &[Row]) -> String {
    let mut s = format!("| {} |\n", HEAD.join(" | "));
    s += &format!(
        "|{}|\n",
        HEAD.iter()
            .enumerate()
            .map(|(i, _)| if i < 3 { "---" } else { "---:" })
            .collect::<Vec<_>>()
            .join("|")
    );
    for r in rows {
        s += &format!("| {} |\n", cells(r).join(" | "));
    }
    s + "\n" + &notes(rows)
}

/// The generated BENCHMARKS.md section (between the markers).
pub fn section(rows: &[Row], m: &Machine, command: &str) -> String {
    format!(
        "{BEGIN}\n\
         _Generated by `{command}` on {date}; do not edit by hand between these markers._\n\n\
         Machine: {cpu}, {cores} cores, {mem} GiB, Linux {kernel}, {qemu}. Same run: memcpy \
         {memcpy:.2} GB/s, loopback TCP {tcp:.2} GB/s (`livemig bench` references).\n\n\
         {table}\n{END}",
        date = m.date,
        cpu = m.cpu,
        cores = m.cores,
        mem = m.memory >> 30,
        kernel = m.kernel,
        qemu = m.qemu,
        memcpy = m.memcpy / 1e9,
        tcp = m.tcp / 1e9,
        table = markdown_table(rows),
    )
}

/// Replaces the text between [`BEGIN`] and [`END`] in `doc` with `section`
/// (which carries the markers); appends it when the markers are absent.
pub fn replace_section(doc: &str, section: &str) -> Result<String, String> {
    match (doc.find(BEGIN), doc.find(END)) {
        (Some(b), Some(e)) if b < e => {
            Ok(format!("{}{}{}", &doc[..b], section, &doc[e + END.len()..]))
        }
        (None, None) => {
            let sep = if doc.ends_with('\n') { "\n" } else { "\n\n" };
            Ok(format!("{doc}{sep}{section}\n"))
        }
        _ => Err(format!(
            "the markers {BEGIN} and {END} are not both present, in that order"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::{CheckResult, GuestKind};
    use crate::run::Variant;
    use std::time::Duration;

    fn row(system: &str, ran: bool, converged: bool, ok: Option<bool>) -> Row {
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
            outcome: Outcome {
                system: system.into(),
                ran,
                status: if converged { "completed" } else { "cancelled" }.into(),
                converged,
                total_ms: 2000,
                downtime_ms: 25,
                setup_ms: 3,
                bytes: 3 << 29,
                mbps: 8000.0,
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
                note: String::new(),
            },
        }
    }

    #[test]
    fn tables_show_figures_convergence_and_checks() {
        let rows = vec![
            row("qemu", true, true, Some(false)),
            row("livemig", true, true, Some(true)),
            row("livemig", true, false, None),
            row("livemig", false, false, None),
        ];
        let t = text_table(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("scenario") && lines[0].ends_with("check"));
        assert!(
            lines[1].contains("qemu") && lines[1].ends_with("FAIL"),
            "{}",
            lines[1]
        );
        assert!(lines[1].contains(" 2000 ") && lines[1].contains(" 1536.0 "));
        assert!(lines[1].contains(" 1000 "), "mbps/8: {}", lines[1]);
        assert!(lines[1].contains(" 805 "), "avg MB/s: {}", lines[1]);
        assert!(lines[1].contains(" 40 "), "throttle: {}", lines[1]);
        assert!(lines[2].ends_with("pass"));
        assert!(lines[3].contains(" NO "), "{}", lines[3]);
        let cols: Vec<&str> = lines[3].split_whitespace().collect();
        assert_eq!(
            (cols[4], cols[5]),
            ("2000", "-"),
            "no downtime: {}",
            lines[3]
        );
        assert!(lines[4].contains(" n/a "), "{}", lines[4]);
        assert!(t.contains("check: page 0x1000 stale"));
        assert!(!t.contains("max-bandwidth"), "no capped scenario: {t}");
        let mut capped = row("livemig", true, true, Some(true));
        capped.case.scenario = "heavy-incrementer-1G-300ms-cap256M".into();
        capped.case.variant = Variant::AutoConverge;
        capped.case.max_bandwidth = 256 << 20;
        capped.case.warm_up = true;
        capped.case.throttle_steps = Some((50, 20));
        let t = text_table(&[capped.clone(), capped]);
        assert_eq!(t.matches("max-bandwidth 256 MiB/s").count(), 1, "{t}");
        assert!(t.contains(" auto-converge 50%+20% "), "{t}");
        let md = markdown_table(&rows);
        assert!(md.starts_with("| scenario | variant |"));
        assert_eq!(md.lines().filter(|l| l.starts_with("| incr")).count(), 4);
        assert!(md.lines().nth(1).unwrap().starts_with("|---|---|---|---:|"));
    }

    #[test]
    fn section_is_replaced_between_markers_only() {
        let doc = format!("# B\n\nbefore\n{BEGIN}\nold table\n{END}\nafter\n");
        let new = format!("{BEGIN}\nnew\n{END}");
        let out = replace_section(&doc, &new).unwrap();
        assert_eq!(out, format!("# B\n\nbefore\n{BEGIN}\nnew\n{END}\nafter\n"));
        // Idempotent.
        assert_eq!(replace_section(&out, &new).unwrap(), out);
        // Appended when absent; refused when only one marker is there.
        let appended = replace_section("# B\n", &new).unwrap();
        assert!(appended.starts_with("# B\n\n") && appended.ends_with(&format!("{END}\n")));
        assert!(replace_section(&format!("x {END} y {BEGIN}"), &new).is_err());
        assert!(replace_section(&format!("x {BEGIN} y"), &new).is_err());
    }

    #[test]
    fn section_names_the_machine() {
        let m = Machine {
            cpu: "Xeon".into(),
            cores: 2,
            memory: 24 << 30,
            kernel: "6.18".into(),
            qemu: "QEMU emulator version 7.2.22".into(),
            date: "2026-11-22 16:00 UTC".into(),
            memcpy: 10e9,
            tcp: 3e9,
        };
        let s = section(
            &[row("qemu", true, true, Some(true))],
            &m,
            "livemig-harness",
        );
        assert!(s.starts_with(BEGIN) && s.ends_with(END));
        for want in [
            "Xeon",
            "2 cores",
            "24 GiB",
            "6.18",
            "7.2.22",
            "2026-11-22",
            "10.00 GB/s",
            "3.00 GB/s",
        ] {
            assert!(s.contains(want), "{want} missing: {s}");
        }
    }
}
