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
    /// A time measured elsewhere for this config (on the chip a deviceless ranking predicts
    /// for): see [`TuneReport::attach_measurements`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured_ms: Option<f64>,
}

/// How a ranking's times compare with times measured for the same candidates.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Agreement {
    /// Candidates with both a time of the report's and a measured one.
    pub compared: usize,
    /// Spearman's rank correlation of the two (1: the same order; ties share their mean rank).
    pub spearman: f64,
    /// Where the report's best ranks among the measured times (1: the measured fastest).
    pub best_measured_rank: usize,
    /// The median of measured / the report's time: how far off the absolute times are.
    pub median_ratio: f64,
}

/// Ranks 1..n of `x` (ties get their mean rank).
fn ranks(x: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    let mut r = vec![0.0; x.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && x[order[j + 1]] == x[order[i]] {
            j += 1;
        }
        for &k in &order[i..=j] {
            r[k] = (i + j) as f64 / 2.0 + 1.0;
        }
        i = j + 1;
    }
    r
}

/// Pearson's correlation of the ranks of `a` and `b`; None for fewer than two pairs or a
/// constant side.
fn spearman(a: &[f64], b: &[f64]) -> Option<f64> {
    let (ra, rb) = (ranks(a), ranks(b));
    let n = ra.len() as f64;
    let (ma, mb) = (ra.iter().sum::<f64>() / n, rb.iter().sum::<f64>() / n);
    let cov: f64 = ra.iter().zip(&rb).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let (va, vb): (f64, f64) = (ra.iter().map(|x| (x - ma).powi(2)).sum(), rb.iter().map(|y| (y - mb).powi(2)).sum());
    (ra.len() >= 2 && va > 0.0 && vb > 0.0).then(|| cov / (va * vb).sqrt())
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

/// A config as people write it (`bq = 512, bk=1024`), for matching: no spaces.
fn config_key(text: &str) -> String {
    text.chars().filter(|c| !c.is_whitespace()).collect()
}

impl TuneReport {
    /// Attaches times measured elsewhere — typically on the chip a deviceless ranking predicted
    /// for — to the candidates they name (`"bq=512,bk=1024"` → ms), so that the report shows
    /// the prediction beside the measurement. A config the report does not hold, or a time
    /// that is not a positive number, is an error naming it.
    pub fn attach_measurements(&mut self, measured: &std::collections::BTreeMap<String, f64>) -> Result<(), String> {
        let mut by_key: std::collections::HashMap<String, &mut Candidate> = self.candidates.iter_mut().map(|c| (config_key(&c.config.to_string()), c)).collect();
        for (config, &ms) in measured {
            if !(ms.is_finite() && ms > 0.0) {
                return Err(format!("the measured time of `{config}` must be a positive number of ms; got {ms}"));
            }
            let Some(c) = by_key.get_mut(&config_key(config)) else {
                let known: Vec<String> = self.candidates.iter().take(6).map(|c| c.config.to_string()).collect();
                return Err(format!("`{config}` is not a candidate of this search space (they read like {})", known.join("; ")));
            };
            c.measured_ms = Some(ms);
        }
        Ok(())
    }

    /// How the report's times agree with the attached measurements (see
    /// [`TuneReport::attach_measurements`]); None with fewer than two to compare.
    pub fn agreement(&self) -> Option<Agreement> {
        let pairs: Vec<(&Candidate, f64, f64)> = self.candidates.iter().filter_map(|c| Some((c, c.outcome.ms()?, c.measured_ms?))).collect();
        let (ours, measured): (Vec<f64>, Vec<f64>) = pairs.iter().map(|&(_, a, b)| (a, b)).unzip();
        let spearman = spearman(&ours, &measured)?;
        let best = pairs.iter().find(|(c, _, _)| c.config == self.best_config).map(|&(_, _, m)| m)?;
        let best_measured_rank = 1 + measured.iter().filter(|&&m| m < best).count();
        let ratios: Vec<f64> = pairs.iter().map(|&(_, a, b)| b / a).collect();
        let median_ratio = crate::stats::Summary::of(&ratios).map_or(f64::NAN, |s| s.median_ms);
        Some(Agreement { compared: pairs.len(), spearman, best_measured_rank, median_ratio })
    }

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
            "agreement": self.agreement(),
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
                Outcome::Predicted { ms, code_size_bytes } => {
                    let measured = c.measured_ms.map_or(String::new(), |m| format!("; measured {m:.4} ms"));
                    (format!("{ms:.4}"), format!("predicted, compiled ({code_size_bytes} B){measured}{mark}"))
                }
                Outcome::Pruned { reason } => ("-".into(), format!("pruned: {reason}")),
                Outcome::Failed { reason } => ("-".into(), format!("failed: {reason}")),
                Outcome::NotEvaluated => ("-".into(), "not evaluated".into()),
            };
            let _ = writeln!(s, "{:<width$}  {time:>12}  {status}", c.config.to_string());
        }
        s
    }

    /// The report as a picture: a heatmap when the space has two tunables (time per cell,
    /// pruned cells with their reason, the winner and the default outlined), else bars with
    /// the 95% interval of each timed candidate.
    pub fn plot_svg(&self) -> Result<String, String> {
        self.heatmap_svg().unwrap_or_else(|| self.svg())
    }

    /// A heatmap over the space's two tunables, or `None` for another number of them.
    pub fn heatmap_svg(&self) -> Option<Result<String, String>> {
        use plotters::prelude::*;
        let names: Vec<&str> = self.candidates.first()?.config.0.iter().map(|(n, _)| n.as_str()).collect();
        let [xn, yn] = names[..] else { return None };
        let axis = |name: &str| -> Vec<usize> {
            let mut v: Vec<usize> = self.candidates.iter().filter_map(|c| c.config.get(name)).collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        let (xs, ys) = (axis(xn), axis(yn));
        let times: Vec<f64> = self.candidates.iter().filter_map(|c| c.outcome.ms()).collect();
        let (lo, hi) = times.iter().fold((f64::MAX, f64::MIN), |(a, b), &t| (a.min(t), b.max(t)));
        let (cell_w, cell_h, left, top) = (118i32, 46i32, 120i32, 70i32);
        let (w, h) = (left + cell_w * xs.len() as i32 + 30, top + cell_h * ys.len() as i32 + 110);
        let predicted = self.candidates.iter().any(|c| matches!(c.outcome, Outcome::Predicted { .. }));
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, (w as u32, h as u32)).into_drawing_area();
            let font = |size: i32| ("monospace", size).into_font();
            let draw = || -> Result<(), Box<dyn std::error::Error + '_>> {
                root.fill(&WHITE)?;
                let unit = if predicted { "predicted ms" } else { "median ms" };
                root.draw(&Text::new(format!("{} {} on {} ({}): {unit}", self.kernel, self.problem, self.device, self.strategy), (10, 20), font(13)))?;
                root.draw(&Text::new(format!("{xn} →"), (left, top - 24), font(12)))?;
                root.draw(&Text::new(format!("{yn} ↓"), (10, top - 24), font(12)))?;
                for (i, x) in xs.iter().enumerate() {
                    root.draw(&Text::new(x.to_string(), (left + cell_w * i as i32 + 6, top - 8), font(11)))?;
                }
                for (j, y) in ys.iter().enumerate() {
                    root.draw(&Text::new(y.to_string(), (10, top + cell_h * j as i32 + cell_h / 2), font(11)))?;
                }
                for c in &self.candidates {
                    let (Some(x), Some(y)) = (c.config.get(xn), c.config.get(yn)) else { continue };
                    let (Some(i), Some(j)) = (xs.iter().position(|&v| v == x), ys.iter().position(|&v| v == y)) else { continue };
                    let (x0, y0) = (left + cell_w * i as i32, top + cell_h * j as i32);
                    let (fill, label, note) = match &c.outcome {
                        o @ (Outcome::Timed { .. } | Outcome::Predicted { .. }) => {
                            let t = o.ms().unwrap_or(hi);
                            // Fast green to slow red, on a log scale of time.
                            let f = if hi > lo { ((t / lo).ln() / (hi / lo).ln()).clamp(0.0, 1.0) } else { 0.0 };
                            let color = RGBColor((60.0 + 190.0 * f) as u8, (190.0 - 120.0 * f) as u8, 90);
                            let note = match (o, c.measured_ms) {
                                (_, Some(m)) => format!("measured {m:.3}"),
                                (Outcome::Timed { ci_low_ms, ci_high_ms, .. }, None) => format!("{ci_low_ms:.2}..{ci_high_ms:.2}"),
                                _ => String::new(),
                            };
                            (color, format!("{t:.3}"), note)
                        }
                        Outcome::Pruned { reason } => (RGBColor(215, 215, 215), "pruned".into(), reason.split(':').next().unwrap_or("").chars().take(16).collect()),
                        Outcome::Failed { .. } => (RGBColor(240, 200, 200), "failed".into(), String::new()),
                        Outcome::NotEvaluated => (RGBColor(245, 245, 245), "-".into(), String::new()),
                    };
                    root.draw(&Rectangle::new([(x0, y0), (x0 + cell_w - 2, y0 + cell_h - 2)], fill.filled()))?;
                    root.draw(&Text::new(label, (x0 + 6, y0 + 18), font(12)))?;
                    root.draw(&Text::new(note, (x0 + 6, y0 + 34), font(9)))?;
                    let outline = if c.config == self.best_config {
                        Some(RGBColor(0, 90, 0))
                    } else if c.config == self.default_config {
                        Some(RGBColor(200, 110, 0))
                    } else {
                        None
                    };
                    if let Some(color) = outline {
                        root.draw(&Rectangle::new([(x0, y0), (x0 + cell_w - 2, y0 + cell_h - 2)], color.stroke_width(3)))?;
                    }
                }
                let foot = top + cell_h * ys.len() as i32 + 24;
                root.draw(&Text::new("dark green outline: best; orange outline: default; grey: pruned (reason below the label)", (10, foot), font(11)))?;
                root.draw(&Text::new(format!("decided: {}", self.decision.chars().take(110).collect::<String>()), (10, foot + 18), font(11)))?;
                if let Some(a) = self.agreement() {
                    root.draw(&Text::new(agreement_line(&a), (10, foot + 36), font(11)))?;
                }
                root.present()?;
                Ok(())
            };
            if let Err(e) = draw() {
                return Some(Err(format!("drawing the heatmap: {e}")));
            }
        }
        Some(Ok(svg))
    }

    /// A bar chart of time per evaluated configuration, fastest at the top, with the 95%
    /// interval of each timed one as an error bar.
    pub fn svg(&self) -> Result<String, String> {
        use plotters::prelude::*;
        let mut bars: Vec<(&Candidate, f64)> = self.candidates.iter().filter_map(|c| c.outcome.ms().map(|ms| (c, ms))).collect();
        bars.sort_by(|a, b| a.1.total_cmp(&b.1));
        let interval = |c: &Candidate| match c.outcome {
            Outcome::Timed { ci_low_ms, ci_high_ms, samples, .. } if samples > 0 => Some((ci_low_ms, ci_high_ms)),
            _ => None,
        };
        let max = bars.iter().map(|(c, ms)| interval(c).map_or(*ms, |(_, hi)| hi.max(*ms)).max(c.measured_ms.unwrap_or(0.0))).fold(f64::MIN_POSITIVE, f64::max);
        let (row, left, width) = (18i32, 230i32, 420.0);
        let height = 60 + row * bars.len() as i32;
        let unit = if self.device.starts_with('v') || self.device.starts_with("tpu7") { "predicted ms" } else { "ms" };
        let x_of = |ms: f64| left + (ms / max * width) as i32;
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, ((left + width as i32 + 110) as u32, height as u32)).into_drawing_area();
            let font = |size: i32| ("monospace", size).into_font();
            let draw = || -> Result<(), Box<dyn std::error::Error + '_>> {
                root.fill(&WHITE)?;
                root.draw(&Text::new(format!("{} {} on {} ({}): {unit} per configuration", self.kernel, self.problem, self.device, self.strategy), (10, 20), font(13)))?;
                for (i, (c, ms)) in bars.iter().enumerate() {
                    let y = 40 + row * i as i32;
                    let color = if c.config == self.best_config {
                        RGBColor(0x2a, 0x9d, 0x5c)
                    } else if c.config == self.default_config {
                        RGBColor(0xd0, 0x80, 0x20)
                    } else {
                        RGBColor(0x4a, 0x78, 0xb0)
                    };
                    let label = c.config.to_string();
                    root.draw(&Text::new(label.clone(), (left - 8 - 7 * label.len() as i32, y + 12), font(11)))?;
                    root.draw(&Rectangle::new([(left, y), (x_of(*ms).max(left + 1), y + row - 4)], color.filled()))?;
                    if let Some((lo, hi)) = interval(c) {
                        let mid = y + (row - 4) / 2;
                        root.draw(&PathElement::new(vec![(x_of(lo), mid), (x_of(hi), mid)], BLACK.stroke_width(1)))?;
                        for x in [x_of(lo), x_of(hi)] {
                            root.draw(&PathElement::new(vec![(x, mid - 4), (x, mid + 4)], BLACK.stroke_width(1)))?;
                        }
                    }
                    if let Some(m) = c.measured_ms {
                        // The measured time as a black tick across the bar.
                        let x = x_of(m.min(max));
                        root.draw(&PathElement::new(vec![(x, y - 1), (x, y + row - 3)], BLACK.stroke_width(2)))?;
                    }
                    let measured = c.measured_ms.map_or(String::new(), |m| format!(" (measured {m:.3})"));
                    root.draw(&Text::new(format!("{ms:.3}{measured}"), (x_of(interval(c).map_or(*ms, |(_, hi)| hi.max(*ms))) + 4, y + 12), font(11)))?;
                }
                root.present()?;
                Ok(())
            };
            draw().map_err(|e| format!("drawing the bar chart: {e}"))?;
        }
        Ok(svg)
    }
}

/// One line saying how a ranking agrees with measured times.
pub fn agreement_line(a: &Agreement) -> String {
    format!(
        "against {} measured: rank correlation {:.2}, the best ranks #{} measured, measured / ours {:.2}x (median)",
        a.compared, a.spearman, a.best_measured_rank, a.median_ratio
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(bq: usize, bk: usize) -> Config {
        Config(vec![("bq".into(), bq), ("bk".into(), bk)])
    }

    fn report() -> TuneReport {
        let timed = |ms: f64| Outcome::Timed { median_ms: ms, spread: 0.1, ci_low_ms: ms * 0.95, ci_high_ms: ms * 1.05, samples: 11 };
        let candidates = vec![
            Candidate { config: config(128, 128), outcome: timed(4.0), features: None, measured_ms: None },
            Candidate { config: config(128, 256), outcome: timed(3.25), features: None, measured_ms: None },
            Candidate { config: config(256, 128), outcome: Outcome::Pruned { reason: "VMEM model: 40 MiB".into() }, features: None, measured_ms: None },
            Candidate { config: config(256, 256), outcome: timed(5.5), features: None, measured_ms: None },
        ];
        TuneReport {
            kernel: "k".into(),
            problem: "p".into(),
            device: "cpu".into(),
            strategy: "exhaustive".into(),
            best_config: config(128, 256),
            best_time_ms: 3.25,
            default_config: config(128, 128),
            default_time_ms: Some(4.0),
            evaluated: 3,
            pruned: 1,
            cache_hit: false,
            candidates,
            seconds: 1.0,
            warnings: Vec::new(),
            tied: Vec::new(),
            decision: "separated".into(),
        }
    }

    #[test]
    fn measured_times_sit_beside_predicted_ones_with_their_agreement() {
        let predicted = |ms: f64| Outcome::Predicted { ms, code_size_bytes: 1000 };
        let mut r = report();
        for (c, ms) in r.candidates.iter_mut().zip([1.0, 2.0, 0.0, 3.0]) {
            if ms > 0.0 {
                c.outcome = predicted(ms);
            }
        }
        r.best_config = config(128, 128);
        // Predicted order 1, 2, 3; measured 2.0, 1.5, 6.0: one swap at the top.
        let measured = [("bq=128,bk=128", 2.0), ("bq = 128, bk = 256", 1.5), ("bq=256,bk=256", 6.0)].map(|(k, v)| (k.to_string(), v)).into_iter().collect();
        r.attach_measurements(&measured).expect("every config is a candidate");
        let a = r.agreement().expect("three to compare");
        assert_eq!((a.compared, a.best_measured_rank), (3, 2));
        // Ranks (1, 2, 3) against (2, 1, 3): 1 - 6 Σd² / (n (n² - 1)) = 1 - 6·2/24.
        assert!((a.spearman - 0.5).abs() < 1e-12, "{}", a.spearman);
        assert!((a.median_ratio - 2.0).abs() < 1e-12, "ratios 2, 0.75, 2: {}", a.median_ratio);
        assert!(r.table().contains("measured 1.5000 ms"), "{}", r.table());
        let svg = r.heatmap_svg().expect("two tunables").expect("draws");
        assert!(svg.contains("measured 6.000") && svg.contains("rank correlation 0.50"), "{svg}");
        assert!(r.svg().expect("bars").contains("(measured 2.000)"));
        assert_eq!(r.summary_json()["agreement"]["best_measured_rank"], 2);

        let unknown = [("bq=64,bk=64".to_string(), 1.0)].into_iter().collect();
        assert!(r.attach_measurements(&unknown).expect_err("not a candidate").contains("`bq=64,bk=64` is not a candidate"));
        let negative = [("bq=128,bk=128".to_string(), -1.0)].into_iter().collect();
        assert!(r.attach_measurements(&negative).expect_err("negative").contains("positive number"));
    }

    #[test]
    fn two_tunables_draw_a_heatmap_with_every_cell() {
        let svg = report().heatmap_svg().expect("two tunables").expect("draws");
        assert!(svg.starts_with("<svg") && svg.matches("<rect").count() >= 4, "{svg}");
        for text in ["3.250", "4.000", "5.500", "pruned", "VMEM model", "bq", "bk", "decided: separated"] {
            assert!(svg.contains(text), "missing {text}");
        }
    }

    #[test]
    fn other_spaces_draw_bars() {
        let mut r = report();
        for c in &mut r.candidates {
            c.config.0.truncate(1);
        }
        assert!(r.heatmap_svg().is_none());
        assert!(r.plot_svg().expect("draws").contains("<rect"));
    }
}
