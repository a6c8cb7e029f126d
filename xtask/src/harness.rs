//! Timing and memory measurement shared by every benchmark, and the report (Markdown table +
//! JSON under `target/bench/`).

use std::path::PathBuf;
use std::time::Instant;

use burn::tensor::Device;
use serde::Serialize;

pub use peer::train::charts::{Chart, ChartSeries};

/// How many times to run a measured closure.
#[derive(Debug, Clone, Copy)]
pub struct Repeats {
    /// Untimed runs first (shader compilation, allocator warm-up).
    pub warmup: usize,
    /// Timed runs.
    pub timed: usize,
}

/// Median and spread of repeated timings, in seconds.
#[derive(Debug, Clone, Serialize)]
pub struct Timing {
    /// Median.
    pub median_s: f64,
    /// Fastest.
    pub min_s: f64,
    /// Slowest.
    pub max_s: f64,
    /// Number of timed runs.
    pub runs: usize,
}

impl Timing {
    /// Median, extremes and count of `samples` (seconds; at least one).
    pub fn from_samples(mut samples: Vec<f64>) -> Self {
        samples.sort_by(f64::total_cmp);
        Timing {
            median_s: samples[samples.len() / 2],
            min_s: samples[0],
            max_s: samples[samples.len() - 1],
            runs: samples.len(),
        }
    }

    /// The median, in s or ms.
    pub fn median(&self) -> String {
        if self.median_s >= 1.0 { format!("{:.2} s", self.median_s) } else { format!("{:.1} ms", 1e3 * self.median_s) }
    }

    /// Spread as `(max − min) / median`.
    pub fn spread(&self) -> f64 {
        (self.max_s - self.min_s) / self.median_s
    }
}

/// Runs `f` `repeats.warmup + repeats.timed` times; the clock is read after `device.sync()`.
pub fn time(device: &Device, repeats: Repeats, mut f: impl FnMut()) -> Timing {
    for _ in 0..repeats.warmup {
        f();
        device.sync().ok();
    }
    let samples: Vec<f64> = (0..repeats.timed.max(1))
        .map(|_| {
            device.sync().ok();
            let start = Instant::now();
            f();
            device.sync().ok();
            start.elapsed().as_secs_f64()
        })
        .collect();
    Timing::from_samples(samples)
}

/// Samples this process's resident memory every 2 ms on a background thread and keeps the
/// maximum: the peak of whatever runs between [`PeakMemory::start`] and [`PeakMemory::stop`]
/// (the kernel's own high-water mark cannot be reset in every container).
pub struct PeakMemory {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<Option<u64>>,
}

impl PeakMemory {
    /// Starts sampling. The process's resident memory includes what its allocator keeps from
    /// earlier work (see `peer::allocator`): measurements that must not see each other run in
    /// processes of their own (`bench scaling` does).
    pub fn start() -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut peak = rss_bytes();
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(rss_bytes());
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            peak.max(rss_bytes())
        });
        Self { stop, handle }
    }

    /// Stops sampling and returns the peak resident bytes seen (`None` off Linux).
    pub fn stop(self) -> Option<u64> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle.join().ok().flatten()
    }
}

/// Resident memory of this process now (Linux `/proc/self/statm`).
fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// A benchmark's output: a Markdown table on stdout and a JSON file of its records.
pub struct Report {
    name: String,
    header: Vec<String>,
    rows: Vec<Vec<String>>,
    records: Vec<serde_json::Value>,
}

impl Report {
    /// A report with these column titles.
    pub fn new(name: &str, header: &[&str]) -> Self {
        Self {
            name: name.into(),
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
            records: Vec::new(),
        }
    }

    /// Adds a table row and its JSON record, and prints the row at once (long benchmarks).
    pub fn row(&mut self, cells: Vec<String>, record: impl Serialize) {
        if self.rows.is_empty() {
            println!("| {} |", self.header.join(" | "));
            println!("|{}|", self.header.iter().map(|_| "---").collect::<Vec<_>>().join("|"));
        }
        println!("| {} |", cells.join(" | "));
        self.rows.push(cells);
        self.records.push(serde_json::to_value(record).expect("records serialise"));
    }

    /// Writes `target/bench/<name>.json` (and returns its path).
    pub fn write(&self, extra: serde_json::Value) -> PathBuf {
        let dir = bench_dir();
        std::fs::create_dir_all(&dir).expect("create target/bench");
        let path = dir.join(format!("{}.json", self.name));
        let json = serde_json::json!({
            "benchmark": self.name,
            "machine": machine(),
            "records": self.records,
            "notes": extra,
        });
        std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap()).expect("write bench JSON");
        println!("\nwrote {}", path.display());
        path
    }
}

/// `target/bench/` of the workspace (or `$PEER_BENCH_DIR`).
pub fn bench_dir() -> PathBuf {
    std::env::var_os("PEER_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/bench")))
}

/// CPU model and core count, for the record.
pub fn machine() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    serde_json::json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    })
}

/// `1234567` → `"1.23 M"`.
pub fn si(value: f64) -> String {
    let (scaled, unit) = if value >= 1e9 {
        (value / 1e9, "G")
    } else if value >= 1e6 {
        (value / 1e6, "M")
    } else if value >= 1e3 {
        (value / 1e3, "k")
    } else {
        (value, "")
    };
    format!("{scaled:.2} {unit}")
}

/// Bytes as MiB or GiB.
pub fn bytes(value: Option<u64>) -> String {
    match value {
        Some(b) if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        Some(b) => format!("{:.0} MiB", b as f64 / (1u64 << 20) as f64),
        None => "n/a".into(),
    }
}

/// Writes `<bench dir>/<name>.charts.json` and draws its PNGs (see [`peer::train::charts`]).
pub fn draw_charts(name: &str, charts: &[Chart]) {
    peer::train::charts::draw_charts(&bench_dir(), name, charts);
}
