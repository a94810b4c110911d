//! Tuning results: per-candidate outcomes, the winner, a text table and an SVG plot.

use std::fmt::Write;

use crate::model::Features;
use crate::space::Config;

/// What became of one candidate.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    /// Timed on a device: median and (max - min) / median of the repetitions, and a 95%
    /// confidence interval for the median (see [`crate::stats`]).
    Timed {
        median_ms: f64,
        spread: f64,
        #[serde(default)]
        ci_low_ms: f64,
        #[serde(default)]
        ci_high_ms: f64,
        #[serde(default)]
        samples: usize,
    },
    /// Ranked without hardware: roofline prediction for a chip, from a successful compile.
    Predicted { ms: f64, code_size_bytes: i64 },
    /// Rejected before timing, with the reason (constraint, tiling, VMEM, or the compiler's).
    Pruned { reason: String },
    /// Built and compiled, but failed (or ran past the time limit) when run.
    Failed { reason: String },
    /// Feasible, but the strategy did not spend its budget on it.
    NotEvaluated,
}

impl Outcome {
    pub fn ms(&self) -> Option<f64> {
        match self {
            Outcome::Timed { median_ms, .. } => Some(*median_ms),
            Outcome::Predicted { ms, .. } => Some(*ms),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Candidate {
    pub config: Config,
    pub outcome: Outcome,
    pub features: Option<Features>,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TuneReport {
    pub kernel: String,
    pub problem: String,
    pub device: String,
    pub strategy: String,
    pub best_config: Config,
    pub best_time_ms: f64,
    pub default_config: Config,
    pub default_time_ms: Option<f64>,
    /// Candidates timed (or, without hardware, compiled and ranked).
    pub evaluated: usize,
    pub pruned: usize,
    pub cache_hit: bool,
    pub candidates: Vec<Candidate>,
    pub seconds: f64,
    /// Things the user should know that did not stop tuning (a corrupt cache file, a machine
    /// too noisy to rank).
    #[serde(default)]
    pub warnings: Vec<String>,
    /// Candidates whose timings could not be told apart from the best's (the best included),
    /// when there were several: the winner among them is the tie rule's.
    #[serde(default)]
    pub tied: Vec<Config>,
    /// How the winner was decided.
    #[serde(default)]
    pub decision: String,
}

impl TuneReport {
    /// default time / best time, when the default was measured.
    pub fn speedup(&self) -> Option<f64> {
        self.default_time_ms.map(|d| d / self.best_time_ms)
    }

    /// The summary object `tune --json` prints.
    pub fn summary_json(&self) -> serde_json::Value {
        serde_json::json!({
            "kernel": self.kernel,
            "problem": self.problem,
            "device": self.device,
            "strategy": self.strategy,
            "best_config": self.best_config.to_string(),
            "best_time_ms": self.best_time_ms,
            "default_config": self.default_config.to_string(),
            "default_time_ms": self.default_time_ms,
            "speedup": self.speedup(),
            "evaluated": self.evaluated,
            "pruned": self.pruned,
            "candidates": self.candidates.len(),
            "cache_hit": self.cache_hit,
            "seconds": self.seconds,
            "tied": self.tied.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
            "decision": self.decision,
            "warnings": self.warnings,
        })
    }

    /// One line per candidate, fastest first, then the pruned with their reasons.
    pub fn table(&self) -> String {
        let mut rows: Vec<&Candidate> = self.candidates.iter().collect();
        rows.sort_by(|a, b| match (a.outcome.ms(), b.outcome.ms()) {
            (Some(x), Some(y)) => x.total_cmp(&y),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => std::cmp::Ordering::Equal,
        });
        let width = rows.iter().map(|c| c.config.to_string().len()).max().unwrap_or(6).max(6);
        let mut s = String::new();
        let _ = writeln!(s, "{:<width$}  {:>12}  status", "config", "time (ms)");
        for c in rows {
            let mark = if c.config == self.best_config {
                " <- best"
            } else if c.config == self.default_config {
                " <- default"
            } else {
                ""
            };
            let (time, status) = match &c.outcome {
                Outcome::Timed { median_ms, spread, ci_low_ms, ci_high_ms, samples } => {
                    let tie = if self.tied.contains(&c.config) { ", tied" } else { "" };
                    (format!("{median_ms:.3}"), format!("timed: 95% CI {ci_low_ms:.3}..{ci_high_ms:.3} over {samples} runs (spread {:.0}%){tie}{mark}", spread * 100.0))
                }
                Outcome::Predicted { ms, code_size_bytes } => (format!("{ms:.4}"), format!("predicted, compiled ({code_size_bytes} B){mark}")),
                Outcome::Pruned { reason } => ("-".into(), format!("pruned: {reason}")),
                Outcome::Failed { reason } => ("-".into(), format!("failed: {reason}")),
                Outcome::NotEvaluated => ("-".into(), "not evaluated".into()),
            };
            let _ = writeln!(s, "{:<width$}  {time:>12}  {status}", c.config.to_string());
        }
        s
    }

    /// A bar chart of time per evaluated configuration, fastest at the top.
    pub fn svg(&self) -> String {
        let mut bars: Vec<(&Candidate, f64)> = self.candidates.iter().filter_map(|c| c.outcome.ms().map(|ms| (c, ms))).collect();
        bars.sort_by(|a, b| a.1.total_cmp(&b.1));
        let max = bars.iter().map(|b| b.1).fold(f64::MIN_POSITIVE, f64::max);
        let (row, left, width) = (18.0, 230.0, 420.0);
        let height = 60.0 + row * bars.len() as f64;
        let unit = if self.device.starts_with('v') || self.device.starts_with("tpu7") { "predicted ms" } else { "ms" };
        let mut s = String::new();
        let _ = writeln!(s, r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{height}" font-family="monospace" font-size="11">"#, left + width + 90.0);
        let _ = writeln!(s, r#"<text x="10" y="20" font-size="13">{} {} on {} ({}): {unit} per configuration</text>"#, self.kernel, self.problem, self.device, self.strategy);
        for (i, (c, ms)) in bars.iter().enumerate() {
            let y = 40.0 + row * i as f64;
            let w = (ms / max * width).max(1.0);
            let color = if c.config == self.best_config {
                "#2a9d5c"
            } else if c.config == self.default_config {
                "#d08020"
            } else {
                "#4a78b0"
            };
            let _ = writeln!(s, r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#, left - 6.0, y + 12.0, c.config);
            let _ = writeln!(s, r#"<rect x="{left}" y="{y}" width="{w:.1}" height="{}" fill="{color}"/>"#, row - 4.0);
            let _ = writeln!(s, r#"<text x="{:.1}" y="{}">{ms:.3}</text>"#, left + w + 4.0, y + 12.0);
        }
        s.push_str("</svg>\n");
        s
    }
}
