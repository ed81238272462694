//! One SVG chart per scenario: for each variant, livemig's and QEMU's
//! median total time and downtime as bars, their min-max as whiskers.

use crate::report::{Agg, Machine, Stat};

const W: f64 = 760.0;
const PANEL_H: f64 = 220.0;
const LEFT: f64 = 70.0;
/// Variant label, then (system, figure) per bar.
type Groups<'a> = Vec<(String, Vec<(&'a str, Option<Stat>)>)>;

const COLORS: [(&str, &str); 3] = [
    ("livemig", "#1f77b4"),
    ("qemu", "#d62728"),
    ("livemig-base", "#7f7f7f"),
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A file name for `scenario`'s chart (the link rate appended).
pub fn file_stem(scenario: &str, m: &Machine) -> String {
    let net = if m.network.starts_with("loopback") {
        "loopback".to_string()
    } else {
        m.network
            .split("tbf to ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or("link")
            .to_string()
    };
    let s: String = scenario
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{s}-{net}")
}

fn panel(out: &mut String, y0: f64, title: &str, groups: &Groups) {
    let max = groups
        .iter()
        .flat_map(|g| g.1.iter().filter_map(|(_, s)| s.map(|s| s.max)))
        .fold(0.0f64, f64::max)
        .max(1.0);
    let plot_w = W - LEFT - 20.0;
    let top = y0 + 24.0;
    let h = PANEL_H - 70.0;
    let base = top + h;
    out.push_str(&format!(
        "<text x=\"{LEFT}\" y=\"{:.0}\" font-weight=\"bold\">{}</text>\n",
        y0 + 14.0,
        esc(title)
    ));
    for i in 0..=4 {
        let v = max * i as f64 / 4.0;
        let y = base - h * i as f64 / 4.0;
        out.push_str(&format!(
            "<line x1=\"{LEFT}\" y1=\"{y:.1}\" x2=\"{:.0}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{:.0}\" y=\"{:.1}\" text-anchor=\"end\" font-size=\"10\">{v:.0}</text>\n",
            W - 20.0,
            LEFT - 4.0,
            y + 3.0
        ));
    }
    let gw = plot_w / groups.len().max(1) as f64;
    for (gi, (label, bars)) in groups.iter().enumerate() {
        let gx = LEFT + gi as f64 * gw;
        let bw = (gw * 0.7 / bars.len().max(1) as f64).min(40.0);
        for (bi, (system, st)) in bars.iter().enumerate() {
            let x = gx + gw * 0.15 + bi as f64 * bw;
            let color = COLORS
                .iter()
                .find(|c| c.0 == *system)
                .map(|c| c.1)
                .unwrap_or("#888");
            match st {
                Some(s) => {
                    let y = |v: f64| base - h * v / max;
                    out.push_str(&format!(
                        "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" \
                         fill=\"{color}\"><title>{system}: median {:.0} (min {:.0}, max {:.0}, \
                         {} runs)</title></rect>\n",
                        y(s.median),
                        bw - 2.0,
                        base - y(s.median),
                        s.median,
                        s.min,
                        s.max,
                        s.n
                    ));
                    let cx = x + (bw - 2.0) / 2.0;
                    out.push_str(&format!(
                        "<line x1=\"{cx:.1}\" y1=\"{:.1}\" x2=\"{cx:.1}\" y2=\"{:.1}\" \
                         stroke=\"black\"/><line x1=\"{:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" \
                         y2=\"{:.1}\" stroke=\"black\"/><line x1=\"{:.1}\" y1=\"{:.1}\" \
                         x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"black\"/>\n",
                        y(s.min),
                        y(s.max),
                        cx - 4.0,
                        y(s.min),
                        cx + 4.0,
                        y(s.min),
                        cx - 4.0,
                        y(s.max),
                        cx + 4.0,
                        y(s.max),
                    ));
                }
                None => out.push_str(&format!(
                    "<text x=\"{x:.1}\" y=\"{:.1}\" font-size=\"9\" fill=\"{color}\">none</text>\n",
                    base - 4.0
                )),
            }
        }
        out.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"middle\">{}</text>\n",
            gx + gw / 2.0,
            base + 14.0,
            esc(label)
        ));
    }
}

/// (scenario, SVG text) for every scenario in `aggs`.
pub fn charts(aggs: &[Agg], m: &Machine) -> Vec<(String, String)> {
    let mut scenarios: Vec<String> = Vec::new();
    for a in aggs {
        if !scenarios.contains(&a.case.scenario) {
            scenarios.push(a.case.scenario.clone());
        }
    }
    scenarios
        .into_iter()
        .map(|sc| {
            let mut variants: Vec<String> = Vec::new();
            for a in aggs.iter().filter(|a| a.case.scenario == sc) {
                if !variants.contains(&a.case.variant_label()) {
                    variants.push(a.case.variant_label());
                }
            }
            let groups = |f: &dyn Fn(&Agg) -> Option<Stat>| -> Groups {
                variants
                    .iter()
                    .map(|v| {
                        let bars = COLORS
                            .iter()
                            .filter_map(|(sys, _)| {
                                aggs.iter()
                                    .find(|a| {
                                        a.case.scenario == sc
                                            && &a.case.variant_label() == v
                                            && a.system == *sys
                                    })
                                    .map(|a| (*sys, f(a)))
                            })
                            .collect();
                        (v.clone(), bars)
                    })
                    .collect()
            };
            let h = 60.0 + 2.0 * PANEL_H;
            let mut out = format!(
                "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{h}\" \
                 font-family=\"sans-serif\" font-size=\"12\">\n\
                 <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
                 <text x=\"10\" y=\"18\" font-size=\"14\" font-weight=\"bold\">{}</text>\n\
                 <text x=\"10\" y=\"36\" font-size=\"10\">{} · {} runs per system, medians, \
                 whiskers min-max · {}</text>\n",
                esc(&sc),
                esc(&m.network),
                m.reps,
                esc(&m.date)
            );
            let mut lx = W - 170.0;
            for (sys, color) in COLORS {
                out.push_str(&format!(
                    "<rect x=\"{lx}\" y=\"8\" width=\"10\" height=\"10\" fill=\"{color}\"/>\
                     <text x=\"{}\" y=\"17\">{sys}</text>\n",
                    lx + 14.0
                ));
                lx += 80.0;
            }
            panel(
                &mut out,
                44.0,
                "total time, ms (runs without error; a cancelled run counts its budget)",
                &groups(&|a| a.total_ms),
            );
            panel(
                &mut out,
                44.0 + PANEL_H,
                &format!(
                    "downtime, ms (completed runs; limit {} ms)",
                    aggs.iter()
                        .find(|a| a.case.scenario == sc)
                        .map(|a| a.case.downtime_ms)
                        .unwrap_or(0)
                ),
                &groups(&|a| a.downtime_ms),
            );
            out.push_str("</svg>\n");
            (sc, out)
        })
        .collect()
}
