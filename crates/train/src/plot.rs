//! The loss curve as an SVG image (`loss.svg` in the run directory).
//!
//! Written directly as SVG: a plotting crate would need a font file to lay
//! out its labels, and this machine-independent output needs none (the
//! viewer renders the text).

use crate::metrics::Record;
use crate::TrainError;
use std::fmt::Write;
use std::path::Path;

const W: f64 = 720.0;
const H: f64 = 420.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 36.0;
const BOTTOM: f64 = 48.0;

fn nice_step(range: f64, ticks: usize) -> f64 {
    let raw = range / ticks as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    mag * if norm < 1.5 {
        1.0
    } else if norm < 3.5 {
        2.0
    } else if norm < 7.5 {
        5.0
    } else {
        10.0
    }
}

/// Renders train loss (a line) and validation loss (points and a line).
pub fn loss_svg(records: &[Record], title: &str) -> String {
    let train: Vec<(f64, f64)> =
        records.iter().filter(|r| r.train_loss.is_finite()).map(|r| (r.step as f64, r.train_loss)).collect();
    let val: Vec<(f64, f64)> =
        records.iter().filter_map(|r| r.val_loss.filter(|v| v.is_finite()).map(|v| (r.step as f64, v))).collect();
    let all = train.iter().chain(&val);
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in all {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 - x0 < 1.0 {
        x1 = x0 + 1.0;
    }
    if y1 - y0 < 1e-6 {
        y1 = y0 + 1.0;
    }
    let pad = (y1 - y0) * 0.05;
    let (y0, y1) = (y0 - pad, y1 + pad);
    let sx = |x: f64| LEFT + (x - x0) / (x1 - x0) * (W - LEFT - RIGHT);
    let sy = |y: f64| TOP + (y1 - y) / (y1 - y0) * (H - TOP - BOTTOM);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(s, r#"<text x="{}" y="22" text-anchor="middle" font-size="14">{}</text>"#, W / 2.0, escape(title));
    let ystep = nice_step(y1 - y0, 6);
    let mut y = (y0 / ystep).ceil() * ystep;
    while y <= y1 {
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" x2="{0}" y1="{1:.1}" y2="{1:.1}" stroke="#e5e5e5"/><text x="{2}" y="{3:.1}" text-anchor="end">{4}</text>"##,
            W - RIGHT,
            sy(y),
            LEFT - 6.0,
            sy(y) + 4.0,
            fmt_tick(y, ystep)
        );
        y += ystep;
    }
    let xstep = nice_step(x1 - x0, 8).max(1.0);
    let mut x = (x0 / xstep).ceil() * xstep;
    while x <= x1 {
        let _ =
            writeln!(s, r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#, sx(x), H - BOTTOM + 16.0, x as u64);
        x += xstep;
    }
    let _ = writeln!(
        s,
        r#"<rect x="{LEFT}" y="{TOP}" width="{}" height="{}" fill="none" stroke="black"/>"#,
        W - LEFT - RIGHT,
        H - TOP - BOTTOM
    );
    let _ = writeln!(s, r#"<text x="{}" y="{}" text-anchor="middle">step</text>"#, (LEFT + W - RIGHT) / 2.0, H - 10.0);
    let _ = writeln!(
        s,
        r#"<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {0})">loss</text>"#,
        (TOP + H - BOTTOM) / 2.0
    );
    let line = |pts: &[(f64, f64)]| {
        pts.iter().map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y))).collect::<Vec<_>>().join(" ")
    };
    let _ = writeln!(s, r##"<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{}"/>"##, line(&train));
    let _ = writeln!(s, r##"<polyline fill="none" stroke="#d62728" stroke-width="1.5" points="{}"/>"##, line(&val));
    for &(x, y) in &val {
        let _ = writeln!(s, r##"<circle cx="{:.1}" cy="{:.1}" r="3" fill="#d62728"/>"##, sx(x), sy(y));
    }
    let lx = W - RIGHT - 150.0;
    let _ = writeln!(
        s,
        r##"<line x1="{lx}" x2="{}" y1="{}" y2="{1}" stroke="#1f77b4" stroke-width="2"/><text x="{}" y="{}">train loss</text>"##,
        lx + 20.0,
        TOP + 16.0,
        lx + 26.0,
        TOP + 20.0
    );
    let _ = writeln!(
        s,
        r##"<line x1="{lx}" x2="{}" y1="{}" y2="{1}" stroke="#d62728" stroke-width="2"/><text x="{}" y="{}">validation loss</text>"##,
        lx + 20.0,
        TOP + 34.0,
        lx + 26.0,
        TOP + 38.0
    );
    s.push_str("</svg>\n");
    s
}

fn fmt_tick(v: f64, step: f64) -> String {
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    format!("{v:.decimals$}")
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

pub fn write_loss_svg(path: &Path, records: &[Record], title: &str) -> Result<(), TrainError> {
    std::fs::write(path, loss_svg(records, title)).map_err(|e| TrainError::io("cannot write plot", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svg_has_both_curves_and_handles_empty_input() {
        let recs: Vec<Record> = (0..10)
            .map(|i| Record {
                step: i,
                train_loss: 10.0 - i as f64 * 0.5,
                val_loss: (i % 5 == 4).then_some(9.0 - i as f64 * 0.4),
                lr: 1e-3,
                grad_norm: 1.0,
                tokens_per_s: 1.0,
                step_ms: 1.0,
            })
            .collect();
        let s = loss_svg(&recs, "tiny <run>");
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert_eq!(s.matches("<circle").count(), 2);
        assert!(s.contains("tiny &lt;run&gt;"));
        assert!(loss_svg(&[], "empty").contains("</svg>"));
    }
}
