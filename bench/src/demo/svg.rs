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
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
/// Height of the title band, and of one legend row.
const TITLE: f64 = 44.0;
const ROW: f64 = 20.0;
const PLOT_H: f64 = 330.0;
const PANEL_H: f64 = 150.0;
/// Below a plot: tick labels and the x axis label.
const BOTTOM: f64 = 50.0;

/// A plot's frame on the canvas.
#[derive(Clone, Copy)]
struct Area {
    x: f64,
    y: f64,
    w: f64,
    h: f64,
}

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

/// Empirical CDFs of `series` on a shared x axis from the smallest sample (rounded down to a
/// tick) to the largest sample at or below the `x_quantile` of each series. The legend is a
/// band above the plot, so it never covers a curve.
pub fn cdf_chart(title: &str, x_label: &str, series: &[Series<'_>], x_quantile: f64) -> String {
    let sorted: Vec<Vec<f64>> = series.iter().map(|s| sorted_finite(s.values)).collect();
    let rows = legend_rows(series);
    let top = TITLE + ROW * rows.len() as f64 + 10.0;
    let height = top + PLOT_H + BOTTOM;
    let mut s = open_svg(height, title);
    legend(&mut s, series, &rows, TITLE);
    let area = Area {
        x: LEFT,
        y: top,
        w: W - LEFT - RIGHT,
        h: PLOT_H,
    };
    let all: Vec<(&Series<'_>, &[f64])> = series
        .iter()
        .zip(sorted.iter().map(Vec::as_slice))
        .collect();
    plot(&mut s, area, x_label, &all, x_quantile);
    s.push_str("</svg>\n");
    s
}

/// One CDF panel per series, stacked, each with its own x axis: distributions far apart on a
/// shared axis (in-region vs cross-region TTFT) each show their shape.
pub fn cdf_panels(title: &str, x_label: &str, unit: &str, series: &[Series<'_>]) -> String {
    let height = TITLE + series.len() as f64 * (ROW + PANEL_H + BOTTOM);
    let mut s = open_svg(height, title);
    for (i, serie) in series.iter().enumerate() {
        let v = sorted_finite(serie.values);
        let y = TITLE + i as f64 * (ROW + PANEL_H + BOTTOM);
        let summary = match (v.first(), v.last()) {
            (Some(_), Some(_)) => format!(
                "{} (n={}): p50 {:.1} {unit}, p99 {:.1} {unit}, max {:.1} {unit}",
                serie.name,
                v.len(),
                quantile(&v, 0.5),
                quantile(&v, 0.99),
                quantile(&v, 1.0)
            ),
            _ => format!("{} (no samples)", serie.name),
        };
        let _ = writeln!(
            s,
            r#"<text x="{LEFT}" y="{:.1}" font-weight="bold" fill="{}">{}</text>"#,
            y + 14.0,
            escape(serie.color),
            escape(&summary)
        );
        let area = Area {
            x: LEFT,
            y: y + ROW,
            w: W - LEFT - RIGHT,
            h: PANEL_H,
        };
        plot(&mut s, area, x_label, &[(serie, &v)], 1.0);
    }
    s.push_str("</svg>\n");
    s
}

fn sorted_finite(values: &[f64]) -> Vec<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    v
}

/// The sample at quantile `q` of sorted, non-empty `v` (nearest rank).
fn quantile(v: &[f64], q: f64) -> f64 {
    v[((v.len() - 1) as f64 * q).round() as usize]
}

fn open_svg(height: f64, title: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" viewBox="0 0 {W} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{height}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="28" text-anchor="middle" font-size="16" font-weight="bold">{}</text>"#,
        W / 2.0,
        escape(title)
    );
    s
}

/// Legend entries per row: as many as fit across the canvas (text width estimated at 7 px
/// per character).
fn legend_rows(series: &[Series<'_>]) -> Vec<Vec<usize>> {
    let mut rows: Vec<Vec<usize>> = Vec::new();
    let mut used = f64::INFINITY;
    for (i, serie) in series.iter().enumerate() {
        let width = legend_width(serie);
        if used + width > W - LEFT - RIGHT {
            rows.push(Vec::new());
            used = 0.0;
        }
        if let Some(row) = rows.last_mut() {
            row.push(i);
        }
        used += width;
    }
    rows
}

fn legend_label(serie: &Series<'_>) -> String {
    format!("{} (n={})", serie.name, serie.values.len())
}

fn legend_width(serie: &Series<'_>) -> f64 {
    40.0 + 7.0 * legend_label(serie).chars().count() as f64
}

fn legend(s: &mut String, series: &[Series<'_>], rows: &[Vec<usize>], top: f64) {
    s.push_str("<g class=\"legend\">\n");
    for (r, row) in rows.iter().enumerate() {
        let y = top + ROW * r as f64 + 14.0;
        let mut x = LEFT;
        for &i in row {
            let serie = &series[i];
            let _ = writeln!(
                s,
                r#"<line x1="{x:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{}" stroke-width="3"/><text x="{:.1}" y="{y:.1}">{}</text>"#,
                y - 4.0,
                x + 24.0,
                y - 4.0,
                escape(serie.color),
                x + 30.0,
                escape(&legend_label(serie))
            );
            x += legend_width(serie);
        }
    }
    s.push_str("</g>\n");
}

/// Grid, ticks, frame, axis labels and one CDF step curve per series inside `area`.
fn plot(
    s: &mut String,
    area: Area,
    x_label: &str,
    series: &[(&Series<'_>, &[f64])],
    x_quantile: f64,
) {
    let lo = series
        .iter()
        .filter_map(|(_, v)| v.first())
        .copied()
        .fold(f64::INFINITY, f64::min);
    let hi = series
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(_, v)| quantile(v, x_quantile))
        .fold(f64::NEG_INFINITY, f64::max);
    let (lo, hi) = if lo.is_finite() && hi.is_finite() {
        (lo, hi.max(lo + 1e-9))
    } else {
        (0.0, 1.0)
    };
    let step = nice_step(hi - lo, 8.0);
    let x0 = (lo / step).floor() * step;
    let x1 = ((hi / step).ceil() * step).max(x0 + step);
    let Area {
        x: left,
        y: top,
        w: pw,
        h: ph,
    } = area;
    let sx = |x: f64| left + (x.clamp(x0, x1) - x0) / (x1 - x0) * pw;
    let sy = |y: f64| top + (1.0 - y) * ph;

    let mut x = x0;
    for _ in 0..100 {
        if x > x1 + step / 2.0 {
            break;
        }
        let px = sx(x);
        let _ = writeln!(
            s,
            r##"<line x1="{px:.1}" y1="{top}" x2="{px:.1}" y2="{:.1}" stroke="#e5e5e5"/><text x="{px:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            top + ph,
            top + ph + 18.0,
            fmt_tick(x, step)
        );
        x += step;
    }
    let y_ticks = if ph < 200.0 { 2 } else { 5 };
    for i in 0..=y_ticks {
        let y = i as f64 / y_ticks as f64;
        let py = sy(y);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#e5e5e5"/><text x="{:.1}" y="{:.1}" text-anchor="end">{y:.1}</text>"##,
            left + pw,
            left - 8.0,
            py + 4.0
        );
    }
    let _ = writeln!(
        s,
        r#"<rect class="plot" x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        left + pw / 2.0,
        top + ph + 38.0,
        escape(x_label)
    );
    let _ = writeln!(
        s,
        r#"<text x="18" y="{:.1}" text-anchor="middle" transform="rotate(-90 18 {:.1})">CDF</text>"#,
        top + ph / 2.0,
        top + ph / 2.0
    );
    // Curves: a step function through (x_i, (i+1)/n).
    for (serie, v) in series {
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

    /// (x1, y1) of every `<line>` inside the legend group, and the plot frame's top edge.
    fn legend_lines_and_plot_top(svg: &str) -> (Vec<f64>, f64) {
        let attr = |el: &str, name: &str| -> f64 {
            let from = el.find(&format!(" {name}=\"")).unwrap() + name.len() + 3;
            el[from..].split('"').next().unwrap().parse().unwrap()
        };
        let legend = svg.split("<g class=\"legend\">").nth(1).unwrap();
        let legend = legend.split("</g>").next().unwrap();
        let ys = legend
            .split("<line")
            .skip(1)
            .map(|el| attr(el, "y1"))
            .collect();
        let plot = svg.split("<rect class=\"plot\"").nth(1).unwrap();
        (ys, attr(plot, "y"))
    }

    #[test]
    fn the_legend_sits_above_the_plot_however_many_series() {
        let values = [1.0, 2.0, 3.0];
        let names: Vec<String> = (0..7)
            .map(|i| format!("a rather long scenario name {i}"))
            .collect();
        let series: Vec<Series<'_>> = names
            .iter()
            .map(|name| Series {
                name,
                color: "#123456",
                values: &values,
            })
            .collect();
        let svg = cdf_chart("t", "ms", &series, 1.0);
        let (ys, plot_top) = legend_lines_and_plot_top(&svg);
        assert_eq!(ys.len(), 7);
        assert!(
            ys.iter().all(|&y| y + ROW / 2.0 < plot_top),
            "{ys:?} vs {plot_top}"
        );
    }

    #[test]
    fn each_panel_spreads_its_own_distribution_across_the_width() {
        // Far apart and narrow, like in-region and cross-region TTFTs.
        let near = [20.7, 20.9, 21.2, 21.5, 24.8];
        let far = [294.0, 296.0, 298.6, 305.0, 331.7];
        let svg = cdf_panels(
            "t",
            "ms",
            "ms",
            &[
                Series {
                    name: "near",
                    color: "#1f77b4",
                    values: &near,
                },
                Series {
                    name: "far",
                    color: "#2ca02c",
                    values: &far,
                },
            ],
        );
        let curves: Vec<&str> = svg
            .split("points=\"")
            .skip(1)
            .map(|p| p.split('"').next().unwrap())
            .collect();
        assert_eq!(curves.len(), 2);
        for points in curves {
            let xs: Vec<f64> = points
                .split_whitespace()
                .map(|p| p.split(',').next().unwrap().parse().unwrap())
                .collect();
            let spread = xs.iter().copied().fold(f64::MIN, f64::max)
                - xs.iter().copied().fold(f64::MAX, f64::min);
            assert!(
                spread > (W - LEFT - RIGHT) / 2.0,
                "a curve only {spread:.0} px wide"
            );
        }
        assert!(
            svg.contains("near (n=5): p50 21.2 ms, p99 24.8 ms"),
            "{svg}"
        );
    }
}
