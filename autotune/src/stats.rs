//! Deciding a winner from noisy timings: a distribution-free confidence interval for each
//! candidate's median, confirmation runs until the best separates from the runner-up (or the
//! budget ends), ties resolved by a fixed rule, and a warning when the machine is too noisy.

/// A candidate's timings, summarized.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    pub median_ms: f64,
    /// A 95% confidence interval for the median (order statistics: no assumption about the
    /// distribution of the noise).
    pub ci_low_ms: f64,
    pub ci_high_ms: f64,
    pub samples: usize,
}

impl Summary {
    /// `None` for no samples.
    pub fn of(samples: &[f64]) -> Option<Summary> {
        let mut s: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
        if s.is_empty() {
            return None;
        }
        s.sort_by(f64::total_cmp);
        let n = s.len();
        let median = if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 };
        // The median lies between the k-th smallest and k-th largest with ~95% probability for
        // k = (n - 1.96 √n) / 2 (the normal approximation to the binomial).
        let k = ((n as f64 - 1.96 * (n as f64).sqrt()) / 2.0).floor().max(0.0) as usize;
        let k = k.min((n - 1) / 2);
        Some(Summary { median_ms: median, ci_low_ms: s[k], ci_high_ms: s[n - 1 - k], samples: n })
    }

    /// The interval's width relative to the median: how precisely the median is known.
    pub fn relative_width(&self) -> f64 {
        (self.ci_high_ms - self.ci_low_ms) / self.median_ms.max(f64::MIN_POSITIVE)
    }

    fn overlaps(&self, other: &Summary) -> bool {
        self.ci_low_ms <= other.ci_high_ms && other.ci_low_ms <= self.ci_high_ms
    }
}

/// The outcome of ranking measured candidates.
#[derive(Clone, Debug, PartialEq)]
pub struct Ranking {
    /// The chosen candidate (an index into the ranked set).
    pub best: usize,
    /// Candidates whose interval overlaps the fastest's (the fastest included) when more than
    /// one: a tie, resolved by the rule.
    pub tied: Vec<usize>,
}

/// Ranks candidates by median. Those whose intervals overlap the fastest one's are a tie,
/// resolved by `rule` (smallest wins): the same tie gives the same winner on every run.
pub fn rank<K: PartialOrd>(summaries: &[(usize, Summary)], rule: impl Fn(usize) -> K) -> Option<Ranking> {
    let (_, fastest) = summaries.iter().min_by(|a, b| a.1.median_ms.total_cmp(&b.1.median_ms))?;
    let mut tied: Vec<usize> = summaries.iter().filter(|(_, s)| s.overlaps(fastest)).map(|&(i, _)| i).collect();
    tied.sort_by(|&a, &b| rule(a).partial_cmp(&rule(b)).unwrap_or(std::cmp::Ordering::Equal));
    let best = *tied.first()?;
    if tied.len() < 2 {
        tied.clear();
    }
    Some(Ranking { best, tied })
}

/// How much confirmation a ranking gets.
#[derive(Clone, Copy, Debug)]
pub struct Confirmation {
    /// Rounds of extra repetitions for the contenders, at most.
    pub max_rounds: usize,
    /// Repetitions each contender gets per round.
    pub reps: usize,
    /// Above this relative interval width of the fastest, the machine is too noisy to rank.
    pub noisy: f64,
}

impl Default for Confirmation {
    fn default() -> Self {
        Confirmation { max_rounds: 4, reps: 10, noisy: 0.15 }
    }
}

/// What confirming found, for the report.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    pub ranking: Ranking,
    pub summaries: Vec<(usize, Summary)>,
    pub rounds: usize,
    /// A message for the user when the fastest's interval stayed wide.
    pub noise_warning: Option<String>,
}

/// Adds repetitions to the candidates tied with the fastest until its interval separates
/// from theirs or the rounds run out. `samples[i]` holds candidate `i`'s times so far (only
/// candidates with samples take part); `time(i, reps)` returns more. `rule` breaks ties.
pub fn confirm<K: PartialOrd>(samples: &mut [Vec<f64>], mut time: impl FnMut(usize, usize) -> Vec<f64>, rule: impl Fn(usize) -> K + Copy, c: Confirmation) -> Option<Verdict> {
    let summarize = |samples: &[Vec<f64>]| -> Vec<(usize, Summary)> { samples.iter().enumerate().filter_map(|(i, s)| Summary::of(s).map(|m| (i, m))).collect() };
    let mut summaries = summarize(samples);
    let mut ranking = rank(&summaries, rule)?;
    let mut rounds = 0;
    while !ranking.tied.is_empty() && rounds < c.max_rounds {
        for &i in &ranking.tied {
            let more = time(i, c.reps);
            samples[i].extend(more);
        }
        rounds += 1;
        summaries = summarize(samples);
        ranking = rank(&summaries, rule)?;
    }
    let fastest = summaries.iter().map(|(_, s)| *s).min_by(|a, b| a.median_ms.total_cmp(&b.median_ms))?;
    let noise_warning = (fastest.relative_width() > c.noisy).then(|| {
        format!(
            "the machine is too noisy to rank these candidates: the fastest one's median is only known to within {:.0}% ({:.3}..{:.3} ms over {} runs); close other work and tune again",
            fastest.relative_width() * 100.0,
            fastest.ci_low_ms,
            fastest.ci_high_ms,
            fastest.samples
        )
    });
    Some(Verdict { ranking, summaries, rounds, noise_warning })
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    /// A synthetic timer: candidate `i` takes `true_ms[i]` plus uniform noise of `noise`
    /// (relative), drawn from a seeded generator.
    struct Synthetic {
        true_ms: Vec<f64>,
        noise: f64,
        rng: StdRng,
    }

    impl Synthetic {
        fn new(true_ms: &[f64], noise: f64, seed: u64) -> Self {
            Synthetic { true_ms: true_ms.to_vec(), noise, rng: StdRng::seed_from_u64(seed) }
        }
        fn time(&mut self, i: usize, reps: usize) -> Vec<f64> {
            (0..reps).map(|_| self.true_ms[i] * (1.0 + self.noise * self.rng.random_range(-1.0..1.0))).collect()
        }
        fn initial(&mut self, reps: usize) -> Vec<Vec<f64>> {
            (0..self.true_ms.len()).map(|i| self.time(i, reps)).collect()
        }
    }

    fn decide(true_ms: &[f64], noise: f64, seed: u64, rule: impl Fn(usize) -> usize + Copy) -> Verdict {
        let mut t = Synthetic::new(true_ms, noise, seed);
        let mut samples = t.initial(7);
        confirm(&mut samples, |i, reps| t.time(i, reps), rule, Confirmation::default()).expect("candidates")
    }

    #[test]
    fn separated_candidates_are_ranked_by_their_true_times() {
        for seed in 0..20 {
            let v = decide(&[10.0, 8.0, 12.0, 8.8], 0.02, seed, |i| i);
            assert_eq!(v.ranking.best, 1, "seed {seed}: {v:?}");
            assert!(v.ranking.tied.is_empty() && v.noise_warning.is_none(), "seed {seed}: {v:?}");
        }
    }

    #[test]
    fn indistinguishable_candidates_are_a_tie_resolved_by_the_rule_on_every_run() {
        // 8.0 and 8.02 ms under 5% noise: no number of confirmation rounds separates them.
        let rule = |i: usize| [3, 2, 9, 1][i];
        for seed in 0..20 {
            let v = decide(&[8.02, 8.0, 12.0, 8.01], 0.05, seed, rule);
            assert!(v.ranking.tied.contains(&1) && v.ranking.tied.contains(&3), "seed {seed}: {v:?}");
            assert!(!v.ranking.tied.contains(&2), "seed {seed}: {v:?}");
            assert_eq!(v.ranking.best, 3, "seed {seed}: the rule's pick among the tied: {v:?}");
            assert_eq!(v.rounds, Confirmation::default().max_rounds, "seed {seed}");
        }
    }

    #[test]
    fn a_noisy_machine_produces_the_warning() {
        let v = decide(&[10.0, 20.0], 0.6, 1, |i| i);
        let w = v.noise_warning.expect("60% noise is too much to rank");
        assert!(w.contains("too noisy"), "{w}");
        assert!(decide(&[10.0, 20.0], 0.01, 1, |i| i).noise_warning.is_none());
    }

    #[test]
    fn the_median_interval_covers_the_middle_order_statistics() {
        let s = Summary::of(&[5.0, 1.0, 3.0, 2.0, 4.0]).expect("samples");
        assert_eq!((s.median_ms, s.ci_low_ms, s.ci_high_ms, s.samples), (3.0, 1.0, 5.0, 5));
        let many: Vec<f64> = (0..100).map(f64::from).collect();
        let s = Summary::of(&many).expect("samples");
        assert!(s.ci_low_ms > 35.0 && s.ci_high_ms < 64.0 && s.ci_low_ms < s.median_ms && s.median_ms < s.ci_high_ms, "{s:?}");
        assert_eq!(Summary::of(&[]), None);
        assert_eq!(Summary::of(&[f64::NAN]), None);
    }
}
