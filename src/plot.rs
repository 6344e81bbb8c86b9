//! Small line charts for training curves and reports, and grouped bar charts (with error
//! bars) for result tables, as SVG (text labels) and PNG (rasterized here, with a built-in
//! 3×5 pixel font so no font files are needed).

use crate::error::Result;
use std::path::Path;

/// One curve.
pub struct Series {
    pub label: String,
    pub color: [u8; 3],
    pub points: Vec<(f64, f64)>,
}

/// A chart panel: title, axis names, curves.
pub struct Panel {
    pub title: String,
    pub x_label: String,
    pub series: Vec<Series>,
}

pub const COLORS: [[u8; 3]; 4] = [
    [31, 119, 180],
    [214, 39, 40],
    [44, 160, 44],
    [148, 103, 189],
];

/// More colors, for charts with more series (COLORS first).
pub const PALETTE: [[u8; 3]; 8] = [
    [31, 119, 180],
    [214, 39, 40],
    [44, 160, 44],
    [148, 103, 189],
    [255, 127, 14],
    [140, 86, 75],
    [227, 119, 194],
    [23, 190, 207],
];

const W: usize = 480;
const H: usize = 320;
const M: (usize, usize, usize, usize) = (44, 16, 28, 30); // left, right, top, bottom

fn bounds(p: &Panel) -> (f64, f64, f64, f64) {
    let pts = p
        .series
        .iter()
        .flat_map(|s| s.points.iter())
        .filter(|(x, y)| x.is_finite() && y.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        return (0.0, 1.0, 0.0, 1.0);
    }
    let pad = ((y1 - y0) * 0.05).max(1e-9);
    (x0, x1.max(x0 + 1e-9), y0 - pad, y1 + pad)
}

fn fmt_tick(v: f64) -> String {
    if v.abs() >= 100.0 || v == v.round() {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The panels side by side as one SVG document.
pub fn svg(panels: &[Panel]) -> String {
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{H}\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
        W * panels.len()
    );
    for (i, p) in panels.iter().enumerate() {
        let ox = i * W;
        let (x0, x1, y0, y1) = bounds(p);
        let (pw, ph) = ((W - M.0 - M.1) as f64, (H - M.2 - M.3) as f64);
        let px = |x: f64| ox as f64 + M.0 as f64 + (x - x0) / (x1 - x0) * pw;
        let py = |y: f64| M.2 as f64 + (1.0 - (y - y0) / (y1 - y0)) * ph;
        s += &format!(
            "<text x=\"{}\" y=\"16\" font-size=\"13\">{}</text>\n",
            ox + M.0,
            p.title
        );
        s += &format!(
            "<rect x=\"{}\" y=\"{}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#888\"/>\n",
            ox + M.0,
            M.2
        );
        for k in 0..=4 {
            let (xv, yv) = (
                x0 + (x1 - x0) * k as f64 / 4.0,
                y0 + (y1 - y0) * k as f64 / 4.0,
            );
            s += &format!(
                "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n",
                px(xv),
                H - M.3 + 14,
                fmt_tick(xv)
            );
            s += &format!(
                "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n",
                ox + M.0 - 4,
                py(yv) + 4.0,
                fmt_tick(yv)
            );
        }
        s += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n",
            ox + W / 2,
            H - 4,
            p.x_label
        );
        for (k, ser) in p.series.iter().enumerate() {
            let pts: Vec<String> = ser
                .points
                .iter()
                .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
                .collect();
            let [r, g, b] = ser.color;
            s += &format!("<polyline fill=\"none\" stroke=\"rgb({r},{g},{b})\" stroke-width=\"1.5\" points=\"{}\"/>\n", pts.join(" "));
            s += &format!(
                "<text x=\"{}\" y=\"{}\" fill=\"rgb({r},{g},{b})\" text-anchor=\"end\">{}</text>\n",
                ox + W - M.1 - 4,
                M.2 + 14 + 14 * k,
                ser.label
            );
        }
    }
    s + "</svg>\n"
}

/// 3×5 glyphs, one row per u8 (bits 2..0 = left..right). Digits, a–z, and `.-/:`.
fn glyph(c: char) -> [u8; 5] {
    match c.to_ascii_lowercase() {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 3, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 2, 2],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        'a' => [2, 5, 7, 5, 5],
        'b' => [6, 5, 6, 5, 6],
        'c' => [3, 4, 4, 4, 3],
        'd' => [6, 5, 5, 5, 6],
        'e' => [7, 4, 6, 4, 7],
        'f' => [7, 4, 6, 4, 4],
        'g' => [3, 4, 5, 5, 3],
        'h' => [5, 5, 7, 5, 5],
        'i' => [7, 2, 2, 2, 7],
        'j' => [1, 1, 1, 5, 2],
        'k' => [5, 5, 6, 5, 5],
        'l' => [4, 4, 4, 4, 7],
        'm' => [5, 7, 7, 5, 5],
        'n' => [6, 5, 5, 5, 5],
        'o' => [2, 5, 5, 5, 2],
        'p' => [6, 5, 6, 4, 4],
        'q' => [2, 5, 5, 6, 3],
        'r' => [6, 5, 6, 5, 5],
        's' => [3, 4, 2, 1, 6],
        't' => [7, 2, 2, 2, 2],
        'u' => [5, 5, 5, 5, 7],
        'v' => [5, 5, 5, 5, 2],
        'w' => [5, 5, 7, 7, 5],
        'x' => [5, 5, 2, 5, 5],
        'y' => [5, 5, 2, 2, 2],
        'z' => [7, 1, 2, 4, 7],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        '/' => [1, 1, 2, 4, 4],
        ':' => [0, 2, 0, 2, 0],
        '+' => [0, 2, 7, 2, 0],
        '_' => [0, 0, 0, 0, 7],
        '(' => [1, 2, 2, 2, 1],
        ')' => [4, 2, 2, 2, 4],
        '=' => [0, 7, 0, 7, 0],
        ',' => [0, 0, 0, 2, 4],
        '%' => [5, 1, 2, 4, 5],
        '>' => [4, 2, 1, 2, 4],
        '<' => [1, 2, 4, 2, 1],
        '#' => [5, 7, 5, 7, 5],
        '\u{2192}' => [2, 1, 7, 1, 2], // →
        _ => [0; 5],
    }
}

struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
}

impl Canvas {
    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            let i = (y as usize * self.w + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }
    /// Bresenham line, 2 px thick.
    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: [u8; 3]) {
        let steps = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
        for k in 0..=steps {
            let t = k as f64 / steps as f64;
            let (x, y) = (
                (x0 + (x1 - x0) * t).round() as i64,
                (y0 + (y1 - y0) * t).round() as i64,
            );
            self.set(x, y, c);
            self.set(x, y + 1, c);
        }
    }
    /// Text at 2× scale (6×10 px per glyph plus spacing).
    fn text(&mut self, x: i64, y: i64, s: &str, c: [u8; 3]) {
        for (i, ch) in s.chars().enumerate() {
            let g = glyph(ch);
            for (row, bits) in g.iter().enumerate() {
                for col in 0..3 {
                    if bits >> (2 - col) & 1 == 1 {
                        for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                            self.set(x + i as i64 * 8 + col * 2 + dx, y + row as i64 * 2 + dy, c);
                        }
                    }
                }
            }
        }
    }
}

/// The panels side by side as PNG bytes.
pub fn png(panels: &[Panel]) -> Vec<u8> {
    let mut cv = Canvas {
        w: W * panels.len(),
        h: H,
        px: vec![255; W * panels.len() * H * 3],
    };
    let grey = [136, 136, 136];
    let black = [0, 0, 0];
    for (i, p) in panels.iter().enumerate() {
        let ox = (i * W) as f64;
        let (x0, x1, y0, y1) = bounds(p);
        let (pw, ph) = ((W - M.0 - M.1) as f64, (H - M.2 - M.3) as f64);
        let px = |x: f64| ox + M.0 as f64 + (x - x0) / (x1 - x0) * pw;
        let py = |y: f64| M.2 as f64 + (1.0 - (y - y0) / (y1 - y0)) * ph;
        let (l, r, t, b) = (
            ox + M.0 as f64,
            ox + M.0 as f64 + pw,
            M.2 as f64,
            M.2 as f64 + ph,
        );
        for (a, z) in [
            ((l, t), (r, t)),
            ((r, t), (r, b)),
            ((r, b), (l, b)),
            ((l, b), (l, t)),
        ] {
            cv.line(a, z, grey);
        }
        cv.text(ox as i64 + M.0 as i64, 6, &p.title, black);
        for k in 0..=4 {
            let (xv, yv) = (
                x0 + (x1 - x0) * k as f64 / 4.0,
                y0 + (y1 - y0) * k as f64 / 4.0,
            );
            let xs = fmt_tick(xv);
            cv.text(
                px(xv) as i64 - 4 * xs.len() as i64,
                (H - M.3 + 6) as i64,
                &xs,
                black,
            );
            let ys = fmt_tick(yv);
            cv.text(
                l as i64 - 4 - 8 * ys.len() as i64,
                py(yv) as i64 - 5,
                &ys,
                black,
            );
        }
        cv.text(
            ox as i64 + (W / 2) as i64 - 4 * p.x_label.len() as i64,
            (H - 12) as i64,
            &p.x_label,
            black,
        );
        for (k, s) in p.series.iter().enumerate() {
            for w in s.points.windows(2) {
                cv.line((px(w[0].0), py(w[0].1)), (px(w[1].0), py(w[1].1)), s.color);
            }
            cv.text(
                r as i64 - 8 * s.label.len() as i64 - 4,
                t as i64 + 6 + 14 * k as i64,
                &s.label,
                s.color,
            );
        }
    }
    encode_png(&cv)
}

/// Writes `stem.png` and `stem.svg` atomically.
pub fn write(stem: &Path, panels: &[Panel]) -> Result<()> {
    crate::fsio::write_bytes_atomic(&stem.with_extension("png"), &png(panels))?;
    crate::fsio::write_bytes_atomic(&stem.with_extension("svg"), svg(panels).as_bytes())
}

/// One series of a grouped bar chart: per group, a value and its error bar (±), or none.
pub struct BarSeries {
    pub label: String,
    pub color: [u8; 3],
    pub values: Vec<Option<(f64, f64)>>,
}

/// A bar chart panel: groups along x (labels may hold `\n` for a second line), one bar per
/// series in each group.
pub struct BarPanel {
    pub title: String,
    pub groups: Vec<String>,
    pub series: Vec<BarSeries>,
}

const BAR_W: usize = 10;
const GROUP_GAP: usize = 14;
const BAR_BOTTOM: usize = 40; // room for two lines of group labels

/// Wide enough for every group's bars and its label (8 px per glyph in the PNG), and for
/// the title and legend line.
fn bar_width(p: &BarPanel) -> usize {
    let label = p
        .groups
        .iter()
        .flat_map(|g| g.lines())
        .map(|l| l.chars().count() * 8 + 8)
        .max()
        .unwrap_or(0);
    let per_group = (p.series.len().max(1) * BAR_W + GROUP_GAP).max(label);
    let top = M.0 + M.1 + legend_x(p) + legend_len(p);
    (M.0 + M.1 + p.groups.len() * per_group).max(W).max(top)
}

/// The legend runs along the top line, after the title: its offset from the left margin.
fn legend_x(p: &BarPanel) -> usize {
    p.title.chars().count() * 8 + 24
}

fn legend_len(p: &BarPanel) -> usize {
    p.series
        .iter()
        .map(|s| s.label.chars().count() * 8 + 16)
        .sum()
}

/// The y range of a bar panel: every bar ± its error, and 0 (bars start there).
fn bar_bounds(p: &BarPanel) -> (f64, f64) {
    let (mut y0, mut y1) = (0.0f64, 0.0f64);
    for s in &p.series {
        for &(v, e) in s.values.iter().flatten() {
            if v.is_finite() {
                let e = if e.is_finite() { e.abs() } else { 0.0 };
                y0 = y0.min(v - e);
                y1 = y1.max(v + e);
            }
        }
    }
    let pad = ((y1 - y0) * 0.05).max(1e-9);
    (y0 - if y0 < 0.0 { pad } else { 0.0 }, y1 + pad)
}

/// Pixel geometry shared by the SVG and PNG bar renderers.
struct BarGeo {
    y0: f64,
    y1: f64,
    plot_h: f64,
    group_w: f64,
}

impl BarGeo {
    fn new(p: &BarPanel, width: usize) -> BarGeo {
        let (y0, y1) = bar_bounds(p);
        let plot_w = (width - M.0 - M.1) as f64;
        BarGeo {
            y0,
            y1,
            plot_h: (H - M.2 - BAR_BOTTOM) as f64,
            group_w: plot_w / p.groups.len().max(1) as f64,
        }
    }
    fn py(&self, y: f64) -> f64 {
        M.2 as f64 + (1.0 - (y - self.y0) / (self.y1 - self.y0)) * self.plot_h
    }
    /// Left edge of bar `k` of `n` in group `g`.
    fn bx(&self, g: usize, k: usize, n: usize) -> f64 {
        let used = (n * BAR_W) as f64;
        M.0 as f64 + g as f64 * self.group_w + (self.group_w - used) / 2.0 + (k * BAR_W) as f64
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Bar panels stacked top to bottom as one SVG document.
pub fn bars_svg(panels: &[BarPanel]) -> String {
    let width = panels.iter().map(bar_width).max().unwrap_or(W);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
        H * panels.len().max(1)
    );
    for (i, p) in panels.iter().enumerate() {
        let oy = (i * H) as f64;
        let g = BarGeo::new(p, width);
        let plot_w = (width - M.0 - M.1) as f64;
        s += &format!(
            "<g transform=\"translate(0,{oy})\">\n<text x=\"{}\" y=\"16\" font-size=\"13\">{}</text>\n",
            M.0,
            esc(&p.title)
        );
        s += &format!(
            "<rect x=\"{}\" y=\"{}\" width=\"{plot_w}\" height=\"{}\" fill=\"none\" stroke=\"#888\"/>\n",
            M.0, M.2, g.plot_h
        );
        for k in 0..=4 {
            let yv = g.y0 + (g.y1 - g.y0) * k as f64 / 4.0;
            s += &format!(
                "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n",
                M.0 - 4,
                g.py(yv) + 4.0,
                fmt_tick(yv)
            );
        }
        if g.y0 < 0.0 {
            s += &format!(
                "<line x1=\"{}\" x2=\"{}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#888\"/>\n",
                M.0,
                width - M.1,
                g.py(0.0),
                g.py(0.0)
            );
        }
        let n = p.series.len();
        for (gi, label) in p.groups.iter().enumerate() {
            let cx = M.0 as f64 + (gi as f64 + 0.5) * g.group_w;
            for (li, line) in label.lines().enumerate() {
                s += &format!(
                    "<text x=\"{cx:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"10\">{}</text>\n",
                    M.2 as f64 + g.plot_h + 13.0 + 12.0 * li as f64,
                    esc(line)
                );
            }
            for (k, ser) in p.series.iter().enumerate() {
                let Some(Some((v, e))) = ser.values.get(gi) else {
                    continue;
                };
                if !v.is_finite() {
                    continue;
                }
                let [r, gg, b] = ser.color;
                let x = g.bx(gi, k, n);
                let (ya, yb) = (g.py(v.max(0.0)), g.py(v.min(0.0)));
                s += &format!(
                    "<rect x=\"{x:.1}\" y=\"{ya:.1}\" width=\"{}\" height=\"{:.1}\" fill=\"rgb({r},{gg},{b})\"/>\n",
                    BAR_W - 1,
                    (yb - ya).max(0.5)
                );
                if e.is_finite() && *e > 0.0 {
                    let cx = x + (BAR_W - 1) as f64 / 2.0;
                    s += &format!(
                        "<line x1=\"{cx:.1}\" x2=\"{cx:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"black\"/>\n",
                        g.py(v + e),
                        g.py(v - e)
                    );
                }
            }
        }
        let mut lx = M.0 + legend_x(p);
        for ser in &p.series {
            let [r, gg, b] = ser.color;
            s += &format!(
                "<rect x=\"{lx}\" y=\"7\" width=\"9\" height=\"9\" fill=\"rgb({r},{gg},{b})\"/><text x=\"{}\" y=\"16\">{}</text>\n",
                lx + 12,
                esc(&ser.label)
            );
            lx += ser.label.chars().count() * 8 + 16;
        }
        s += "</g>\n";
    }
    s + "</svg>\n"
}

/// Bar panels stacked top to bottom as PNG bytes.
pub fn bars_png(panels: &[BarPanel]) -> Vec<u8> {
    let width = panels.iter().map(bar_width).max().unwrap_or(W);
    let height = H * panels.len().max(1);
    let mut cv = Canvas {
        w: width,
        h: height,
        px: vec![255; width * height * 3],
    };
    let grey = [136, 136, 136];
    let black = [0, 0, 0];
    for (i, p) in panels.iter().enumerate() {
        let oy = (i * H) as f64;
        let g = BarGeo::new(p, width);
        let (l, r, t, b) = (
            M.0 as f64,
            (width - M.1) as f64,
            oy + M.2 as f64,
            oy + M.2 as f64 + g.plot_h,
        );
        for (a, z) in [
            ((l, t), (r, t)),
            ((r, t), (r, b)),
            ((r, b), (l, b)),
            ((l, b), (l, t)),
        ] {
            cv.line(a, z, grey);
        }
        if g.y0 < 0.0 {
            let y0 = oy + g.py(0.0);
            cv.line((l, y0), (r, y0), grey);
        }
        cv.text(M.0 as i64, oy as i64 + 6, &p.title, black);
        for k in 0..=4 {
            let yv = g.y0 + (g.y1 - g.y0) * k as f64 / 4.0;
            let ys = fmt_tick(yv);
            cv.text(
                l as i64 - 4 - 8 * ys.len() as i64,
                (oy + g.py(yv)) as i64 - 5,
                &ys,
                black,
            );
        }
        let n = p.series.len();
        let max_chars = ((g.group_w as usize) / 8).max(1);
        for (gi, label) in p.groups.iter().enumerate() {
            let cx = M.0 as f64 + (gi as f64 + 0.5) * g.group_w;
            for (li, line) in label.lines().enumerate() {
                let line: String = line.chars().take(max_chars).collect();
                cv.text(
                    cx as i64 - 4 * line.chars().count() as i64,
                    b as i64 + 6 + 13 * li as i64,
                    &line,
                    black,
                );
            }
            for (k, ser) in p.series.iter().enumerate() {
                let Some(Some((v, e))) = ser.values.get(gi) else {
                    continue;
                };
                if !v.is_finite() {
                    continue;
                }
                let x = g.bx(gi, k, n);
                let (ya, yb) = (oy + g.py(v.max(0.0)), oy + g.py(v.min(0.0)));
                for xx in x as i64..(x as i64 + BAR_W as i64 - 1) {
                    for yy in ya as i64..=(yb as i64).max(ya as i64) {
                        cv.set(xx, yy, ser.color);
                    }
                }
                if e.is_finite() && *e > 0.0 {
                    let cx = x + (BAR_W - 1) as f64 / 2.0;
                    cv.line((cx, oy + g.py(v + e)), (cx, oy + g.py(v - e)), black);
                }
            }
        }
        let mut lx = M.0 + legend_x(p);
        for ser in &p.series {
            cv.text(lx as i64, oy as i64 + 6, &ser.label, ser.color);
            lx += ser.label.chars().count() * 8 + 16;
        }
    }
    encode_png(&cv)
}

fn encode_png(cv: &Canvas) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, cv.w as u32, cv.h as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut wr = enc.write_header().expect("in-memory PNG header");
        wr.write_image_data(&cv.px).expect("in-memory PNG data");
    }
    out
}

/// Writes `stem.png` and `stem.svg` of bar panels atomically.
pub fn write_bars(stem: &Path, panels: &[BarPanel]) -> Result<()> {
    crate::fsio::write_bytes_atomic(&stem.with_extension("png"), &bars_png(panels))?;
    crate::fsio::write_bytes_atomic(&stem.with_extension("svg"), bars_svg(panels).as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_decodes_with_the_curve_drawn() {
        let p = Panel {
            title: "loss".into(),
            x_label: "step".into(),
            series: vec![Series {
                label: "sft".into(),
                color: COLORS[1],
                points: (0..10).map(|i| (i as f64, 10.0 - i as f64)).collect(),
            }],
        };
        let bytes = png(std::slice::from_ref(&p));
        let dec = png::Decoder::new(std::io::Cursor::new(bytes));
        let mut r = dec.read_info().unwrap();
        let mut buf = vec![0; r.output_buffer_size()];
        let info = r.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (W as u32, H as u32));
        let red = buf.chunks(3).filter(|c| c == &COLORS[1]).count();
        assert!(red > 200, "the series' pixels are there ({red})");
        assert!(svg(&[p]).contains("<polyline"));
    }

    #[test]
    fn bars_draw_each_value_with_its_sign() {
        let p = BarPanel {
            title: "rt".into(),
            groups: vec!["a\nx".into(), "b".into()],
            series: vec![
                BarSeries {
                    label: "sft".into(),
                    color: PALETTE[4],
                    values: vec![Some((2.0, 0.5)), Some((-1.0, 0.0))],
                },
                BarSeries {
                    label: "dpo".into(),
                    color: PALETTE[5],
                    values: vec![None, Some((1.0, 0.0))],
                },
            ],
        };
        let bytes = bars_png(std::slice::from_ref(&p));
        let dec = png::Decoder::new(std::io::Cursor::new(bytes));
        let mut r = dec.read_info().unwrap();
        let mut buf = vec![0; r.output_buffer_size()];
        let info = r.next_frame(&mut buf).unwrap();
        let w = info.width as usize;
        // Rows holding each series' color: the 2 ± 0.5 bar above zero spans more rows than
        // the 1.0 bar, and the -1 bar reaches below the zero line.
        let rows_of = |c: [u8; 3]| -> Vec<usize> {
            let mut v: Vec<usize> = buf
                .chunks(3)
                .enumerate()
                .filter(|(i, px)| *px == c && i / w > M.2) // below the title and legend
                .map(|(i, _)| i / w)
                .collect();
            v.dedup();
            v
        };
        let (a, b) = (rows_of(PALETTE[4]), rows_of(PALETTE[5]));
        let span = |v: &[usize]| v.last().unwrap() - v.first().unwrap();
        assert!(!a.is_empty() && !b.is_empty());
        assert!(
            span(&a) > span(&b),
            "sft's bars span 2 above and 1 below zero"
        );
        let svg = bars_svg(&[p]);
        assert_eq!(
            svg.matches("<rect x=").count(),
            1 + 3 + 2,
            "frame + three bars + two legend keys"
        );
        assert_eq!(
            svg.matches("<line x1").count(),
            2,
            "zero line + one error bar"
        );
    }
}
