//! PNG charts: a chart spec (JSON) written beside the results, drawn by the repository's
//! `tools/plot` program.
//!
//! The plotting crate (plotters) lives in `tools/plot`, a cargo workspace of its own: as a
//! dependency here it would change the features of crates shared with Burn and force a
//! second Burn build. `draw_charts` runs it through `cargo run` (built on first use, ~30 s), or
//! runs the binary named by `$PEER_PLOT`. Where neither is available, the spec and the numbers
//! it holds are still written, and the caller is told why no PNG was drawn.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;

/// A PNG chart.
#[derive(Debug, Clone, Serialize)]
pub struct Chart {
    /// PNG file name, written beside the spec.
    pub file: String,
    /// Title.
    pub title: String,
    /// X axis.
    pub x_label: String,
    /// Y axis.
    pub y_label: String,
    /// Lines: `(label, points)`.
    pub series: Vec<ChartSeries>,
    /// Horizontal bars `(label, value)`, when there are no lines.
    pub bars: Vec<(String, f64)>,
    /// Log₂ x axis.
    pub log_x: bool,
    /// Log₁₀ y axis.
    pub log_y: bool,
}

/// One line of a [`Chart`].
#[derive(Debug, Clone, Serialize)]
pub struct ChartSeries {
    /// Legend.
    pub label: String,
    /// `(x, y)`.
    pub points: Vec<(f64, f64)>,
}

impl Chart {
    /// A line chart.
    pub fn lines(file: &str, title: &str, x_label: &str, y_label: &str, log_x: bool, series: Vec<ChartSeries>) -> Self {
        Self {
            file: file.into(),
            title: title.into(),
            x_label: x_label.into(),
            y_label: y_label.into(),
            series,
            bars: Vec::new(),
            log_x,
            log_y: false,
        }
    }

    /// The same chart with a log₁₀ y axis.
    pub fn with_log_y(mut self) -> Self {
        self.log_y = true;
        self
    }

    /// A horizontal bar chart.
    pub fn bars(file: &str, title: &str, x_label: &str, bars: Vec<(String, f64)>) -> Self {
        Self {
            file: file.into(),
            title: title.into(),
            x_label: x_label.into(),
            y_label: String::new(),
            series: Vec::new(),
            bars,
            log_x: false,
            log_y: false,
        }
    }
}

/// Writes `<dir>/<name>.charts.json` and draws its PNGs into `dir`. Returns the PNG paths, or
/// why they were not drawn (no plotting tool, no font, ...): never fatal, the spec holds the
/// numbers.
pub fn try_draw_charts(dir: &Path, name: &str, charts: &[Chart]) -> Result<Vec<PathBuf>, String> {
    let spec = dir.join(format!("{name}.charts.json"));
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    std::fs::write(&spec, serde_json::to_string_pretty(charts).expect("charts serialise"))
        .map_err(|e| format!("{}: {e}", spec.display()))?;
    let mut command = match std::env::var_os("PEER_PLOT") {
        Some(binary) => Command::new(binary),
        None => {
            let manifest = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tools/plot/Cargo.toml"));
            if !manifest.exists() {
                return Err(format!(
                    "the plotting tool ({}) is not here; set PEER_PLOT to a built `peer-plot`",
                    manifest.display()
                ));
            }
            let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
            command.args(["run", "--quiet", "--release", "--manifest-path"]).arg(manifest).arg("--");
            command
        }
    };
    let output = command.arg(&spec).output().map_err(|e| format!("cannot run the plotting tool: {e}"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(format!("the plotting tool failed ({}): {}", output.status, stderr.trim()));
    }
    Ok(charts.iter().map(|c| dir.join(&c.file)).collect())
}

/// [`try_draw_charts`], reporting a failure on stderr.
pub fn draw_charts(dir: &Path, name: &str, charts: &[Chart]) {
    if let Err(why) = try_draw_charts(dir, name, charts) {
        eprintln!("charts not drawn: {why}; the table and the JSON are complete");
    }
}
