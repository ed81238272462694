//! `--report FILE.svg`: a picture of one migration, drawn by hand (no
//! plotting dependency). Four panels share the time axis, one point per
//! sync: pages (dirty at the sync, sent since the previous one, remaining),
//! rates (throughput and dirty rate against the bandwidth cap and the dirty
//! limit), the auto-converge throttle, and the expected downtime against
//! the downtime limit. The title says whether it converged, the total time
//! and the downtime. A migration that switched to postcopy gets a fifth
//! panel on the same time axis: pages pushed in the background against
//! pages the destination asked for (cumulative since the switch), with
//! the vCPU blocktime and the fault latency distribution beside it.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use livemig::engine::{MigrationStats, Params, PostcopyPoint, Status, SyncPoint};

const W: f64 = 1000.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 250.0;
const TOP: f64 = 104.0;
const PANEL_H: f64 = 150.0;
const GAP: f64 = 52.0;
const MIB: f64 = (1u64 << 20) as f64;

/// What the report says besides the per-sync points.
#[derive(Clone, Debug, Default)]
pub struct ReportInfo {
    /// The migration completed.
    pub converged: bool,
    /// Final status, as query-migrate spells it.
    pub status: String,
    /// Total time in ms.
    pub total_time: u64,
    /// Downtime in ms (completed migrations).
    pub downtime: u64,
    /// Downtime limit in ms.
    pub downtime_limit: u64,
    /// Bandwidth cap in bytes/s (0 = none).
    pub max_bandwidth: u64,
    /// Dirty limit of all vCPUs together in bytes/s (0 = none).
    pub dirty_limit_total: u64,
    /// Auto-converge on.
    pub auto_converge: bool,
    /// One line of context (guest, tracker...).
    pub subtitle: String,
    /// The postcopy phase, when the migration switched.
    pub postcopy: Option<PostcopyReport>,
}

/// The postcopy phase of a report.
#[derive(Clone, Debug, Default)]
pub struct PostcopyReport {
    /// Progress points from the switch to the end.
    pub points: Vec<PostcopyPoint>,
    /// Total ms vCPUs (faulting threads) waited for pages.
    pub blocktime_ms: u64,
    /// Mean, median and 99th percentile fault latency, µs.
    pub latency_us: (u64, u64, u64),
    /// Faults per power-of-two µs bucket.
    pub latency_dist: Vec<u64>,
}

impl ReportInfo {
    /// From the final stats and the parameters; `vcpus` scales the
    /// per-vCPU dirty limit (1 for a process workload).
    pub fn new(stats: &MigrationStats, params: &Params, vcpus: u64, subtitle: String) -> Self {
        ReportInfo {
            converged: stats.status == Status::Completed,
            status: serde_json::to_value(stats.status)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_else(|| format!("{:?}", stats.status)),
            total_time: stats.total_time,
            downtime: stats.downtime,
            downtime_limit: params.downtime_limit,
            max_bandwidth: params.max_bandwidth,
            dirty_limit_total: params.dirty_limit * vcpus,
            auto_converge: params.auto_converge,
            subtitle,
            postcopy: None,
        }
    }

    /// Adds the postcopy phase (`points`: the handle's
    /// `postcopy_history`; nothing when empty) with the fault figures of
    /// `stats`.
    pub fn with_postcopy(mut self, stats: &MigrationStats, points: Vec<PostcopyPoint>) -> Self {
        if !points.is_empty() {
            self.postcopy = Some(PostcopyReport {
                points,
                blocktime_ms: stats.postcopy_blocktime.unwrap_or(0),
                latency_us: (
                    stats.postcopy_latency.unwrap_or(0),
                    stats.postcopy_latency_p50.unwrap_or(0),
                    stats.postcopy_latency_p99.unwrap_or(0),
                ),
                latency_dist: stats.postcopy_latency_dist.clone().unwrap_or_default(),
            });
        }
        self
    }
}

/// Writes the report to `path`.
pub fn write(path: &Path, history: &[SyncPoint], info: &ReportInfo) -> Result<()> {
    std::fs::write(path, render(history, info))
        .with_context(|| format!("writing the report {}", path.display()))
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A "nice" axis maximum and step for values up to `max`.
fn nice(max: f64) -> (f64, f64) {
    let max = if max.is_finite() && max > 0.0 {
        max
    } else {
        1.0
    };
    let raw = max / 4.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    ((max / step).ceil() * step, step)
}

fn fmt_num(v: f64) -> String {
    if v >= 1_000_000.0 {
        format!("{:.0}M", v / 1e6)
    } else if v >= 10_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if v.fract().abs() < 1e-9 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

struct Series<'a> {
    id: &'a str,
    label: String,
    color: &'a str,
    dashed: bool,
    step: bool,
    points: Vec<(f64, f64)>,
}

struct Panel<'a> {
    title: &'a str,
    unit: &'a str,
    series: Vec<Series<'a>>,
    /// Fixed y maximum (e.g. 100 for percentages).
    y_max: Option<f64>,
    /// Logarithmic y axis (values below 1 drawn at 1).
    log: bool,
}

/// The SVG document.
pub fn render(history: &[SyncPoint], info: &ReportInfo) -> String {
    let pc_points: &[PostcopyPoint] = info.postcopy.as_ref().map_or(&[], |p| &p.points);
    let t_end = history
        .iter()
        .map(|p| p.time_ms)
        .chain(pc_points.iter().map(|p| p.time_ms))
        .max()
        .unwrap_or(0)
        .max(info.total_time) as f64
        / 1000.0;
    let (x_max, x_step) = nice(t_end.max(0.1));
    let ts: Vec<f64> = history.iter().map(|p| p.time_ms as f64 / 1000.0).collect();
    let pts = |f: &dyn Fn(&SyncPoint) -> f64| -> Vec<(f64, f64)> {
        ts.iter().zip(history).map(|(t, p)| (*t, f(p))).collect()
    };
    let flat = |v: f64| vec![(0.0, v), (x_max, v)];

    let mut rates = vec![
        Series {
            id: "throughput",
            label: "throughput".into(),
            color: "#1f77b4",
            dashed: false,
            step: false,
            points: pts(&|p| p.throughput as f64 / MIB),
        },
        Series {
            id: "dirty-rate",
            label: "dirty rate".into(),
            color: "#d62728",
            dashed: false,
            step: false,
            points: pts(&|p| p.dirty_pages_rate as f64 * 4096.0 / MIB),
        },
    ];
    if info.max_bandwidth > 0 {
        rates.push(Series {
            id: "max-bandwidth",
            label: format!("bandwidth cap {:.0} MiB/s", info.max_bandwidth as f64 / MIB),
            color: "#1f77b4",
            dashed: true,
            step: false,
            points: flat(info.max_bandwidth as f64 / MIB),
        });
    }
    if info.dirty_limit_total > 0 {
        rates.push(Series {
            id: "dirty-limit",
            label: format!(
                "dirty limit, all vCPUs {:.2} MiB/s",
                info.dirty_limit_total as f64 / MIB
            ),
            color: "#d62728",
            dashed: true,
            step: false,
            points: flat(info.dirty_limit_total as f64 / MIB),
        });
    }
    let mut downtime = vec![
        Series {
            id: "expected-downtime",
            label: "expected downtime".into(),
            color: "#2ca02c",
            dashed: false,
            step: false,
            points: pts(&|p| p.expected_downtime as f64),
        },
        Series {
            id: "downtime-limit",
            label: format!("downtime limit {} ms", info.downtime_limit),
            color: "#d62728",
            dashed: true,
            step: false,
            points: flat(info.downtime_limit as f64),
        },
    ];
    if info.converged {
        downtime.push(Series {
            id: "downtime",
            label: format!("actual downtime {} ms", info.downtime),
            color: "#000000",
            dashed: false,
            step: false,
            points: vec![(info.total_time as f64 / 1000.0, info.downtime as f64)],
        });
    }
    let mut panels = vec![
        Panel {
            title: "Pages per sync",
            unit: "pages",
            series: vec![
                Series {
                    id: "dirty-pages",
                    label: "dirty pages (at the sync)".into(),
                    color: "#d62728",
                    dashed: false,
                    step: false,
                    points: pts(&|p| p.dirty_pages as f64),
                },
                Series {
                    id: "sent-pages",
                    label: "pages sent (since the last sync)".into(),
                    color: "#1f77b4",
                    dashed: false,
                    step: false,
                    points: pts(&|p| p.sent_pages as f64),
                },
                Series {
                    id: "remaining-pages",
                    label: "remaining after the sync".into(),
                    color: "#7f7f7f",
                    dashed: false,
                    step: false,
                    points: pts(&|p| p.remaining_pages as f64),
                },
                Series {
                    id: "fit-pages",
                    label: "what fits in the downtime limit".into(),
                    color: "#2ca02c",
                    dashed: true,
                    step: false,
                    points: history
                        .iter()
                        .zip(&ts)
                        .filter(|(p, _)| p.expected_downtime > 0)
                        .map(|(p, t)| {
                            (
                                *t,
                                p.remaining_pages as f64 * info.downtime_limit as f64
                                    / p.expected_downtime as f64,
                            )
                        })
                        .collect(),
                },
            ],
            y_max: None,
            log: true,
        },
        Panel {
            title: "Throughput and dirty rate",
            unit: "MiB/s",
            series: rates,
            y_max: None,
            log: false,
        },
        Panel {
            title: "Auto-converge throttle",
            unit: "%",
            series: vec![Series {
                id: "throttle",
                label: if info.auto_converge {
                    "vCPU throttle".into()
                } else {
                    "vCPU throttle (auto-converge off)".into()
                },
                color: "#ff7f0e",
                dashed: false,
                step: true,
                points: pts(&|p| f64::from(p.throttle)),
            }],
            y_max: Some(100.0),
            log: false,
        },
        Panel {
            title: "Expected downtime",
            unit: "ms",
            series: downtime,
            y_max: None,
            log: true,
        },
    ];
    if let Some(pc) = &info.postcopy {
        let at = |f: &dyn Fn(&PostcopyPoint) -> u64| -> Vec<(f64, f64)> {
            pc.points
                .iter()
                .map(|p| (p.time_ms as f64 / 1000.0, f(p) as f64))
                .collect()
        };
        let last = pc.points.last().cloned().unwrap_or_default();
        panels.push(Panel {
            title: "Postcopy: pages since the switch",
            unit: "pages",
            series: vec![
                Series {
                    id: "pushed-pages",
                    label: format!("pushed in the background ({})", last.pushed_pages),
                    color: "#1f77b4",
                    dashed: false,
                    step: false,
                    points: at(&|p| p.pushed_pages),
                },
                Series {
                    id: "requested-pages",
                    label: format!(
                        "asked for by the destination ({} in {} requests)",
                        last.requested_pages, last.requests
                    ),
                    color: "#d62728",
                    dashed: false,
                    step: false,
                    points: at(&|p| p.requested_pages),
                },
            ],
            y_max: None,
            log: false,
        });
    }

    // Below the panels: the postcopy fault figures and latency histogram.
    let extra = if info.postcopy.is_some() { 150.0 } else { 0.0 };
    let h = TOP + panels.len() as f64 * (PANEL_H + GAP) + 10.0 + extra;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" viewBox="0 0 {W} {h}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="12">"#
    );
    let headline = if info.converged {
        format!(
            "Converged: total {:.1} s, downtime {} ms (limit {} ms)",
            info.total_time as f64 / 1000.0,
            info.downtime,
            info.downtime_limit
        )
    } else {
        format!(
            "Did NOT converge ({} after {:.1} s)",
            info.status,
            info.total_time as f64 / 1000.0,
        )
    };
    let why = if let (true, Some(first)) = (info.converged, pc_points.first()) {
        format!(
            "switched to postcopy at {:.2} s: the guest ran on the destination, which fetched missing pages on demand",
            first.time_ms as f64 / 1000.0
        )
    } else if info.converged {
        "the remaining pages fitted in the downtime limit at the measured bandwidth".to_string()
    } else {
        format!(
            "the pages left after each sync never fitted in the {} ms downtime limit",
            info.downtime_limit
        )
    };
    let _ = writeln!(
        s,
        "<title>livemig migration report: {}</title>",
        esc(&headline)
    );
    let _ = writeln!(
        s,
        r#"<rect x="0" y="0" width="{W}" height="{h}" fill="white"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text id="headline" x="{LEFT}" y="28" font-size="18" font-weight="bold" fill="{}">{}</text>"#,
        if info.converged { "#1a7f37" } else { "#b3261e" },
        esc(&headline)
    );
    let _ = writeln!(
        s,
        r##"<text x="{LEFT}" y="50" font-size="13" fill="#222">{}</text>"##,
        esc(&why)
    );
    let _ = writeln!(
        s,
        r##"<text x="{LEFT}" y="70" font-size="12" fill="#555">{}</text>"##,
        esc(&info.subtitle)
    );
    let pw = W - LEFT - RIGHT;
    for (k, panel) in panels.iter().enumerate() {
        let y0 = TOP + k as f64 * (PANEL_H + GAP);
        let data_max = panel
            .series
            .iter()
            .flat_map(|se| se.points.iter().map(|p| p.1))
            .fold(0.0f64, f64::max);
        let (y_max, y_step) = match panel.y_max {
            Some(m) => (m, m / 4.0),
            None if panel.log => (10f64.powf(data_max.max(10.0).log10().ceil()), 10.0),
            None => nice(data_max * 1.05),
        };
        let xs = |x: f64| LEFT + x / x_max * pw;
        let ys = |y: f64| {
            let f = if panel.log {
                y.max(1.0).log10() / y_max.log10()
            } else {
                y / y_max
            };
            y0 + PANEL_H - f.clamp(0.0, 1.05) * PANEL_H
        };
        let _ = writeln!(s, r#"<g id="panel-{k}">"#);
        let _ = writeln!(
            s,
            r#"<text x="{LEFT}" y="{:.1}" font-size="13" font-weight="bold">{} ({}{})</text>"#,
            y0 - 8.0,
            esc(panel.title),
            esc(panel.unit),
            if panel.log { ", log scale" } else { "" }
        );
        // Grid and y ticks.
        let mut v = if panel.log { 1.0 } else { 0.0 };
        while v <= y_max * (1.0 + 1e-9) {
            let y = ys(v);
            let _ = writeln!(
                s,
                r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e4e4e4"/><text x="{:.1}" y="{:.1}" text-anchor="end" fill="#333">{}</text>"##,
                LEFT + pw,
                LEFT - 6.0,
                y + 4.0,
                fmt_num(v)
            );
            if panel.log {
                v *= y_step;
            } else {
                v += y_step;
            }
        }
        // x ticks.
        let mut t = 0.0;
        while t <= x_max + 1e-9 {
            let x = xs(t);
            let _ = writeln!(
                s,
                r##"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="#e4e4e4"/><text x="{x:.1}" y="{:.1}" text-anchor="middle" fill="#333">{}</text>"##,
                y0,
                y0 + PANEL_H,
                y0 + PANEL_H + 15.0,
                fmt_num(t)
            );
            t += x_step;
        }
        let _ = writeln!(
            s,
            r#"<rect x="{LEFT}" y="{y0:.1}" width="{pw:.1}" height="{PANEL_H}" fill="none" stroke="black"/>"#
        );
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#333">time (s)</text>"##,
            LEFT + pw / 2.0,
            y0 + PANEL_H + 30.0
        );
        let _ = writeln!(
            s,
            r##"<text transform="translate({:.1},{:.1}) rotate(-90)" text-anchor="middle" fill="#333">{}</text>"##,
            LEFT - 52.0,
            y0 + PANEL_H / 2.0,
            esc(panel.unit)
        );
        // Series, then the legend on the right.
        for (j, se) in panel.series.iter().enumerate() {
            let dash = if se.dashed {
                r#" stroke-dasharray="6 4""#
            } else {
                ""
            };
            let mut path = String::new();
            let mut prev: Option<(f64, f64)> = None;
            for &(x, y) in &se.points {
                let (px, py) = (xs(x), ys(y));
                match prev {
                    None => {
                        let _ = write!(path, "M{px:.1},{py:.1}");
                    }
                    Some((_, qy)) if se.step => {
                        let _ = write!(path, " L{px:.1},{qy:.1} L{px:.1},{py:.1}");
                    }
                    Some(_) => {
                        let _ = write!(path, " L{px:.1},{py:.1}");
                    }
                }
                prev = Some((px, py));
            }
            let _ = writeln!(s, r#"<g id="series-{}" class="series">"#, se.id);
            if se.points.len() > 1 {
                let _ = writeln!(
                    s,
                    r#"<path d="{path}" fill="none" stroke="{}" stroke-width="2"{dash}/>"#,
                    se.color
                );
            }
            if !se.dashed {
                for &(x, y) in &se.points {
                    let _ = writeln!(
                        s,
                        r#"<circle cx="{:.1}" cy="{:.1}" r="{}" fill="{}"/>"#,
                        xs(x),
                        ys(y),
                        if se.points.len() == 1 { 4.5 } else { 2.5 },
                        se.color
                    );
                }
            }
            let _ = writeln!(s, "</g>");
            let ly = y0 + 12.0 + j as f64 * 18.0;
            let lx = LEFT + pw + 12.0;
            let _ = writeln!(
                s,
                r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{}" stroke-width="2"{dash}/><text x="{:.1}" y="{:.1}" font-size="11">{}</text>"#,
                lx + 22.0,
                se.color,
                lx + 28.0,
                ly + 4.0,
                esc(&se.label)
            );
        }
        let _ = writeln!(s, "</g>");
    }
    if let Some(pc) = &info.postcopy {
        postcopy_faults(&mut s, pc, TOP + panels.len() as f64 * (PANEL_H + GAP));
    }
    s.push_str("</svg>\n");
    s
}

/// The postcopy fault figures at `y0`: vCPU blocktime, latency mean,
/// p50 and p99, and the latency distribution as bars (one per
/// power-of-two µs bucket, up to the last non-empty one).
fn postcopy_faults(s: &mut String, pc: &PostcopyReport, y0: f64) {
    let faults: u64 = pc.latency_dist.iter().sum();
    let (mean, p50, p99) = pc.latency_us;
    let _ = writeln!(s, r#"<g id="postcopy-faults">"#);
    let _ = writeln!(
        s,
        r#"<text id="postcopy-blocktime" x="{LEFT}" y="{:.1}" font-size="13" font-weight="bold" data-blocktime-ms="{}" data-faults="{faults}">Postcopy faults: vCPU blocktime {} ms over {faults} remote faults; latency mean {mean} us, p50 {p50} us, p99 {p99} us</text>"#,
        y0 - 8.0,
        pc.blocktime_ms,
        pc.blocktime_ms,
    );
    let n = pc
        .latency_dist
        .iter()
        .rposition(|&c| c > 0)
        .map_or(0, |i| i + 1);
    let max = pc.latency_dist.iter().copied().max().unwrap_or(0).max(1) as f64;
    let (bar_h, pw) = (90.0, W - LEFT - RIGHT);
    let bw = if n > 0 {
        (pw / n as f64).min(40.0)
    } else {
        0.0
    };
    let _ = writeln!(
        s,
        r#"<rect x="{LEFT}" y="{y0:.1}" width="{pw:.1}" height="{bar_h}" fill="none" stroke="black"/>"#
    );
    for (i, &c) in pc.latency_dist.iter().take(n).enumerate() {
        let hgt = c as f64 / max * (bar_h - 4.0);
        let x = LEFT + i as f64 * bw;
        let _ = writeln!(
            s,
            r##"<rect class="latency-bucket" data-bucket="{i}" data-count="{c}" x="{:.1}" y="{:.1}" width="{:.1}" height="{hgt:.1}" fill="#9467bd"/><text x="{:.1}" y="{:.1}" font-size="9" text-anchor="middle" fill="#333">{}</text>"##,
            x + 1.0,
            y0 + bar_h - hgt,
            (bw - 2.0).max(1.0),
            x + bw / 2.0,
            y0 + bar_h + 12.0,
            fmt_num((1u64 << i) as f64)
        );
    }
    let _ = writeln!(
        s,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#333">fault latency (us, power-of-two buckets: faults per bucket)</text>"##,
        LEFT + pw / 2.0,
        y0 + bar_h + 28.0
    );
    let _ = writeln!(s, "</g>");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_axes() {
        assert_eq!(nice(0.0), (1.0, 0.25));
        assert_eq!(nice(9.0), (10.0, 2.5));
        assert_eq!(nice(1234.0), (1500.0, 500.0));
    }

    #[test]
    fn postcopy_phase_only_when_switched() {
        let plain = render(&[], &ReportInfo::default());
        assert!(!plain.contains("series-pushed-pages") && !plain.contains("postcopy-faults"));
        let pt = |t, p, r| PostcopyPoint {
            time_ms: t,
            pushed_pages: p,
            requested_pages: r,
            requests: r,
        };
        let info = ReportInfo {
            converged: true,
            total_time: 2000,
            postcopy: Some(PostcopyReport {
                points: vec![pt(1000, 0, 0), pt(1500, 300, 20), pt(2000, 900, 24)],
                blocktime_ms: 7,
                latency_us: (90, 80, 300),
                latency_dist: vec![0, 0, 0, 0, 0, 0, 20, 3, 1, 0],
            }),
            ..ReportInfo::default()
        };
        let s = render(&[], &info);
        assert!(s.contains("switched to postcopy at 1.00 s"));
        assert_eq!(s.matches("class=\"latency-bucket\"").count(), 9);
        assert!(s.contains("data-count=\"20\"") && s.contains("data-faults=\"24\""));
        assert!(s.contains("pushed in the background (900)"));
        assert_eq!(s.matches("<g ").count(), s.matches("</g>").count());
    }

    #[test]
    fn renders_without_points() {
        let s = render(&[], &ReportInfo::default());
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert!(s.contains("Did NOT converge"));
    }
}
