//! Plain progress lines for logs and CI, used instead of Burn's terminal dashboard when stdout
//! is not a terminal.

use std::collections::HashMap;

use burn::train::logger::{EvaluationProgressLogger, TrainingProgressLogger};
use burn::train::metric::{MetricDefinition, MetricId, NumericEntry};
use burn::train::renderer::{
    EvaluationName, MetricState, MetricsRenderer, MetricsRendererEvaluation, MetricsRendererTraining,
};

/// Prints one line per tenth of each split and one line at its end, with every metric.
#[derive(Default)]
pub struct LineRenderer {
    names: HashMap<MetricId, String>,
    values: Vec<(String, String)>,
    epoch: usize,
    epochs: usize,
    split: String,
    total: usize,
    printed_tenths: usize,
}

impl LineRenderer {
    fn record(&mut self, state: MetricState) {
        let (entry, numeric) = match state {
            MetricState::Generic(entry) => (entry, None),
            MetricState::Numeric(entry, numeric) => (entry, numeric),
        };
        let name = self.names.get(&entry.metric_id).cloned().unwrap_or_else(|| "metric".into());
        let value = match numeric {
            Some(NumericEntry::Value(v) | NumericEntry::Final(v)) => format!("{v:.4}"),
            Some(NumericEntry::Aggregated { aggregated_value, .. }) => format!("{aggregated_value:.4}"),
            None => entry.serialized_entry.formatted.clone(),
        };
        match self.values.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = value,
            None => self.values.push((name, value)),
        }
    }

    fn line(&self, progress: &str) -> String {
        let metrics: Vec<String> = self.values.iter().map(|(n, v)| format!("{n} {v}")).collect();
        format!("epoch {}/{} {} {progress} | {}", self.epoch, self.epochs, self.split, metrics.join(" | "))
    }
}

impl MetricsRendererTraining for LineRenderer {
    fn update_train(&mut self, state: MetricState) {
        self.record(state);
    }
    fn update_valid(&mut self, state: MetricState) {
        self.record(state);
    }
}

impl MetricsRendererEvaluation for LineRenderer {
    fn update_test(&mut self, _name: EvaluationName, state: MetricState) {
        self.record(state);
    }
}

impl TrainingProgressLogger for LineRenderer {
    fn start(&mut self, total_epochs: usize, starting_epoch: usize, _items: Option<usize>, _label: Option<&str>) {
        self.epochs = total_epochs;
        self.epoch = starting_epoch;
        println!("training epochs {starting_epoch}..={total_epochs}");
    }
    fn update_epoch(&mut self, epoch: usize) {
        // Burn reports the number of epochs completed.
        self.epoch = epoch + 1;
    }
    fn start_split(&mut self, split: &str, total_items: usize) {
        self.split = split.to_string();
        self.total = total_items;
        self.printed_tenths = 0;
        self.values.clear();
    }
    fn update_split(&mut self, items_processed: usize) {
        let tenths = items_processed * 10 / self.total.max(1);
        if tenths > self.printed_tenths && tenths < 10 {
            self.printed_tenths = tenths;
            println!("{}", self.line(&format!("{}%", tenths * 10)));
        }
    }
    fn end_split(&mut self) {
        println!("{}", self.line("done"));
    }
    fn end(&mut self) {}
    // Burn reports every iteration as an event; the progress lines already cover them.
    fn log_event_training(&mut self, _event: String) {}
}

impl EvaluationProgressLogger for LineRenderer {
    fn start_global_progress(&mut self, _total_tests: usize) {}
    fn start_test(&mut self, name: &str, total_items: usize) {
        self.start_split(name, total_items);
    }
    fn update_test_progress(&mut self, items_processed: usize) {
        self.update_split(items_processed);
    }
    fn end_test(&mut self) {
        self.end_split();
    }
    fn end_global_progress(&mut self) {}
    fn log_event_evaluation(&mut self, _event: String) {}
}

impl MetricsRenderer for LineRenderer {
    fn manual_close(&mut self) {}
    fn register_metric(&mut self, definition: MetricDefinition) {
        self.names.insert(definition.metric_id, definition.name.to_string());
    }
}
