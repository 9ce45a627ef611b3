//! Hand-written SVG line charts (CDFs): axes with ticks and labels, a legend, one polyline
//! per series. No dependencies, opens in any browser.

use std::fmt::Write as _;

pub struct Series<'a> {
    pub name: &'a str,
    pub color: &'a str,
    /// Samples, any order.
    pub values: &'a [f64],
}

const W: f64 = 760.0;
const H: f64 = 440.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;

/// A "nice" tick step (1, 2 or 5 × 10^k) giving about `target` ticks over `span`.
fn nice_step(span: f64, target: f64) -> f64 {
    if span <= 0.0 || !span.is_finite() {
        return 1.0;
    }
    let raw = span / target;
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let nice = if norm <= 1.0 {
        1.0
    } else if norm <= 2.0 {
        2.0
    } else if norm <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn fmt_tick(v: f64, step: f64) -> String {
    if step >= 1.0 {
        format!("{v:.0}")
    } else if step >= 0.1 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Empirical CDFs of `series` on a shared x axis from `x_min` (or the smallest sample,
/// rounded down to a tick) to the largest sample at or below the `x_quantile` of each series.
pub fn cdf_chart(title: &str, x_label: &str, series: &[Series<'_>], x_quantile: f64) -> String {
    let sorted: Vec<Vec<f64>> = series
        .iter()
        .map(|s| {
            let mut v: Vec<f64> = s.values.iter().copied().filter(|x| x.is_finite()).collect();
            v.sort_by(f64::total_cmp);
            v
        })
        .collect();
    let lo = sorted
        .iter()
        .filter_map(|v| v.first())
        .copied()
        .fold(f64::INFINITY, f64::min);
    let hi = sorted
        .iter()
        .filter(|v| !v.is_empty())
        .map(|v| v[((v.len() - 1) as f64 * x_quantile).round() as usize])
        .fold(f64::NEG_INFINITY, f64::max);
    let (lo, hi) = if lo.is_finite() && hi.is_finite() {
        (lo, hi.max(lo + 1e-9))
    } else {
        (0.0, 1.0)
    };
    let step = nice_step(hi - lo, 8.0);
    let x0 = (lo / step).floor() * step;
    let x1 = ((hi / step).ceil() * step).max(x0 + step);
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let sx = |x: f64| LEFT + (x.clamp(x0, x1) - x0) / (x1 - x0) * pw;
    let sy = |y: f64| TOP + (1.0 - y) * ph;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="28" text-anchor="middle" font-size="16" font-weight="bold">{}</text>"#,
        W / 2.0,
        escape(title)
    );
    // Grid and ticks.
    let mut x = x0;
    for _ in 0..100 {
        if x > x1 + step / 2.0 {
            break;
        }
        let px = sx(x);
        let _ = writeln!(
            s,
            r##"<line x1="{px:.1}" y1="{TOP}" x2="{px:.1}" y2="{:.1}" stroke="#e5e5e5"/><text x="{px:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            TOP + ph,
            TOP + ph + 18.0,
            fmt_tick(x, step)
        );
        x += step;
    }
    for i in 0..=5 {
        let y = i as f64 / 5.0;
        let py = sy(y);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#e5e5e5"/><text x="{:.1}" y="{:.1}" text-anchor="end">{y:.1}</text>"##,
            LEFT + pw,
            LEFT - 8.0,
            py + 4.0
        );
    }
    // Axes and labels.
    let _ = writeln!(
        s,
        r#"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        LEFT + pw / 2.0,
        H - 15.0,
        escape(x_label)
    );
    let _ = writeln!(
        s,
        r#"<text x="18" y="{:.1}" text-anchor="middle" transform="rotate(-90 18 {:.1})">fraction of samples ≤ x (CDF)</text>"#,
        TOP + ph / 2.0,
        TOP + ph / 2.0
    );
    // Curves: a step function through (x_i, (i+1)/n).
    for (serie, v) in series.iter().zip(&sorted) {
        if v.is_empty() {
            continue;
        }
        let n = v.len() as f64;
        let mut pts = format!("{:.1},{:.1}", sx(v[0]), sy(0.0));
        for (i, &xv) in v.iter().enumerate() {
            let _ = write!(
                pts,
                " {:.1},{:.1} {:.1},{:.1}",
                sx(xv),
                sy(i as f64 / n),
                sx(xv),
                sy((i + 1) as f64 / n)
            );
        }
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{}" stroke-width="2" points="{pts}"/>"#,
            escape(serie.color)
        );
    }
    // Legend, bottom right inside the plot.
    let lx = LEFT + pw - 260.0;
    let ly = TOP + ph - 20.0 - 20.0 * series.len() as f64;
    let _ = writeln!(
        s,
        r#"<rect x="{lx:.1}" y="{ly:.1}" width="250" height="{:.1}" fill="white" stroke="gray"/>"#,
        20.0 * series.len() as f64 + 10.0
    );
    for (i, serie) in series.iter().enumerate() {
        let y = ly + 18.0 + 20.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{}" stroke-width="3"/><text x="{:.1}" y="{:.1}">{} (n={})</text>"#,
            lx + 10.0,
            y - 4.0,
            lx + 34.0,
            y - 4.0,
            escape(serie.color),
            lx + 42.0,
            y,
            escape(serie.name),
            serie.values.len()
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_steps() {
        assert_eq!(nice_step(100.0, 10.0), 10.0);
        assert_eq!(nice_step(7.0, 8.0), 1.0);
        assert_eq!(nice_step(300.0, 8.0), 50.0);
    }

    #[test]
    fn chart_is_one_svg_element_with_escaped_text() {
        let svg = cdf_chart(
            "a < b",
            "ms",
            &[Series {
                name: "x&y",
                color: "#123456",
                values: &[1.0, 2.0, 3.0],
            }],
            1.0,
        );
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("a &lt; b") && svg.contains("x&amp;y (n=3)"));
    }
}
