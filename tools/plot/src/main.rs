//! `peer-plot <charts.json>`: draws each chart of a spec file written by `cargo xtask bench`
//! as a PNG beside it. Line charts (optionally log₂ x, log₁₀ y) and horizontal bar charts.

use std::path::{Path, PathBuf};

use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};
use serde::Deserialize;

/// One chart.
#[derive(Deserialize)]
struct Chart {
    /// File name of the PNG, written next to the spec.
    file: String,
    title: String,
    x_label: String,
    y_label: String,
    /// Lines: (x, y) points per series.
    #[serde(default)]
    series: Vec<Series>,
    /// Bars: one value per label (drawn when `series` is empty).
    #[serde(default)]
    bars: Vec<(String, f64)>,
    #[serde(default)]
    log_x: bool,
    /// Log₁₀ y axis (values must be positive).
    #[serde(default)]
    log_y: bool,
}

#[derive(Deserialize)]
struct Series {
    label: String,
    points: Vec<(f64, f64)>,
}

/// A TrueType font for labels: `$PEER_PLOT_FONT`, else DejaVu Sans or Liberation Sans where
/// Debian puts them.
fn font() -> Result<Vec<u8>, String> {
    let candidates: Vec<PathBuf> = std::env::var_os("PEER_PLOT_FONT")
        .map(PathBuf::from)
        .into_iter()
        .chain(
            [
                "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
                "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
                "/usr/share/fonts/dejavu/DejaVuSans.ttf",
                "/Library/Fonts/Arial Unicode.ttf",
            ]
            .map(PathBuf::from),
        )
        .collect();
    candidates.iter().find_map(|p| std::fs::read(p).ok()).ok_or_else(|| {
        "no TrueType font found: install fonts-dejavu-core or set PEER_PLOT_FONT to a .ttf file".to_string()
    })
}

fn main() {
    let Some(spec) = std::env::args().nth(1) else {
        eprintln!("usage: peer-plot <charts.json>");
        std::process::exit(2);
    };
    if let Err(e) = run(Path::new(&spec)) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(spec: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(spec).map_err(|e| format!("{}: {e}", spec.display()))?;
    let charts: Vec<Chart> = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", spec.display()))?;
    let font: &'static [u8] = Box::leak(font()?.into_boxed_slice());
    register_font("sans-serif", FontStyle::Normal, font).map_err(|_| "unreadable font".to_string())?;
    let dir = spec.parent().unwrap_or(Path::new("."));
    for chart in &charts {
        let path = dir.join(&chart.file);
        if chart.series.is_empty() { bars(chart, &path) } else { lines(chart, &path) }
            .map_err(|e| format!("{}: {e}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

type Result2 = Result<(), Box<dyn std::error::Error>>;

fn lines(chart: &Chart, path: &Path) -> Result2 {
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let xs = || chart.series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let ys = || chart.series.iter().flat_map(|s| s.points.iter().map(|p| p.1));
    let tx = |x: f64| if chart.log_x { x.log2() } else { x };
    let ty = |y: f64| if chart.log_y { y.log10() } else { y };
    let (x0, x1) = (xs().map(tx).fold(f64::MAX, f64::min), xs().map(tx).fold(f64::MIN, f64::max));
    let pad = ((x1 - x0) * 0.05).max(0.5);
    let (y0, y1) = if chart.log_y {
        let (lo, hi) = (ys().map(ty).fold(f64::MAX, f64::min), ys().map(ty).fold(f64::MIN, f64::max));
        (lo.floor(), hi.ceil().max(lo.floor() + 1.0))
    } else {
        (0.0, ys().fold(0.0, f64::max) * 1.1)
    };
    let mut plot = ChartBuilder::on(&root)
        .caption(&chart.title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(x0 - pad..x1 + pad, y0..y1.max(y0 + 1e-12))?;
    let (log_x, log_y) = (chart.log_x, chart.log_y);
    plot.configure_mesh()
        .x_desc(&chart.x_label)
        .y_desc(&chart.y_label)
        .x_label_formatter(&|x| if log_x { format!("2^{x:.0}") } else { format!("{x}") })
        .y_label_formatter(&|y| if log_y { format!("10^{y:.1}") } else { format!("{y}") })
        .label_style(("sans-serif", 15))
        .draw()?;
    for (i, series) in chart.series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let points: Vec<(f64, f64)> = series.points.iter().map(|&(x, y)| (tx(x), ty(y))).collect();
        plot.draw_series(LineSeries::new(points.clone(), color.stroke_width(3)))?
            .label(&series.label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3)));
        // Markers only where the points are few enough to tell apart (not on dense curves).
        if points.len() <= 30 {
            plot.draw_series(points.into_iter().map(|p| Circle::new(p, 5, color.filled())))?;
        }
    }
    plot.configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()?;
    root.present()?;
    Ok(())
}

fn bars(chart: &Chart, path: &Path) -> Result2 {
    let height = 120 + 36 * chart.bars.len() as u32;
    // Room for the longest label (about 8 px per character at 15 px).
    let label_width = 24 + 8 * chart.bars.iter().map(|b| b.0.chars().count() as u32).max().unwrap_or(0);
    let root = BitMapBackend::new(path, (600 + label_width, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let max = chart.bars.iter().map(|b| b.1).fold(0.0, f64::max) * 1.15;
    let n = chart.bars.len();
    let mut plot = ChartBuilder::on(&root)
        .caption(&chart.title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(label_width)
        .build_cartesian_2d(0.0..max.max(1e-12), (0..n as i32 - 1).into_segmented())?;
    let labels: Vec<String> = chart.bars.iter().map(|b| b.0.clone()).collect();
    plot.configure_mesh()
        .x_desc(&chart.x_label)
        .y_desc(&chart.y_label)
        .y_labels(n)
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) if (0..n as i32).contains(i) => labels[n - 1 - *i as usize].clone(),
            _ => String::new(),
        })
        .label_style(("sans-serif", 15))
        .disable_y_mesh()
        .draw()?;
    // The first bar on top.
    plot.draw_series(chart.bars.iter().enumerate().map(|(i, (_, v))| {
        let color = Palette99::pick(i).filled();
        let row = (n - 1 - i) as i32;
        let mut bar = Rectangle::new([(0.0, SegmentValue::Exact(row)), (*v, SegmentValue::Exact(row + 1))], color);
        bar.set_margin(3, 3, 0, 0);
        bar
    }))?;
    root.present()?;
    Ok(())
}
