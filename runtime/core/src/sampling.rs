//! Choosing the next token from logits: greedy, or temperature / top-k / top-p sampling from a
//! seeded generator, applied in the order `transformers` applies its logits warpers.

use crate::synth::SplitMix64;

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// 0 (or below) picks the most likely token (greedy); otherwise logits are divided by it.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p` (1 = all).
    pub top_p: f32,
    /// Seed of the random generator: the same seed, prompt and model give the same tokens.
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling::greedy()
    }
}

impl Sampling {
    /// Always the most likely token.
    pub fn greedy() -> Sampling {
        Sampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }

    /// True when no randomness is involved.
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0 || self.top_k == 1
    }
}

/// Index of the largest value; the first one on ties, as `argmax` does.
pub fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best
}

/// Picks tokens according to a [`Sampling`].
#[derive(Debug, Clone)]
pub struct Sampler {
    sampling: Sampling,
    rng: SplitMix64,
}

impl Sampler {
    /// A sampler seeded from `sampling.seed`.
    pub fn new(sampling: Sampling) -> Sampler {
        let rng = SplitMix64::new(sampling.seed);
        Sampler { sampling, rng }
    }

    /// The token to emit after `logits` (one row, vocabulary wide).
    pub fn pick(&mut self, logits: &[f32]) -> u32 {
        if self.sampling.is_greedy() || logits.is_empty() {
            return argmax(logits) as u32;
        }
        let t = self.sampling.temperature;
        let mut candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, l)| (i as u32, l / t))
            .collect();
        if candidates.is_empty() {
            return argmax(logits) as u32;
        }
        // Most likely first; the index breaks ties so the order never depends on the sort.
        candidates.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if self.sampling.top_k > 0 {
            candidates.truncate(self.sampling.top_k);
        }
        let max = candidates[0].1;
        let mut probs: Vec<f64> = candidates
            .iter()
            .map(|(_, l)| ((l - max) as f64).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if self.sampling.top_p < 1.0 {
            // Keep tokens until the kept mass reaches top_p (at least one).
            let mut mass = 0.0;
            let mut keep = 0;
            for p in &probs {
                keep += 1;
                mass += p;
                if mass >= self.sampling.top_p as f64 {
                    break;
                }
            }
            probs.truncate(keep);
            candidates.truncate(keep);
            let total: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= total);
        }
        // 53 random bits: finer than f32 steps, so tiny probabilities still get their share.
        let mut r = (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        for (i, p) in probs.iter().enumerate() {
            if r < *p {
                return candidates[i].0;
            }
            r -= p;
        }
        candidates[probs.len() - 1].0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(Sampling::greedy());
        assert_eq!(s.pick(&[0.1, 3.0, 3.0, -1.0]), 1);
    }

    #[test]
    fn top_k_and_top_p_restrict_the_choice_and_seeds_repeat() {
        let logits = [2.0, 1.9, 1.8, -5.0, 1.7];
        let run = |sampling: Sampling| {
            let mut s = Sampler::new(sampling);
            (0..400).map(|_| s.pick(&logits)).collect::<Vec<_>>()
        };
        let base = Sampling {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 7,
        };
        let all = run(base.clone());
        assert_eq!(all, run(base.clone()), "same seed, same tokens");
        assert_ne!(
            all,
            run(Sampling {
                seed: 8,
                ..base.clone()
            })
        );
        for id in [0, 1, 2, 4] {
            assert!(all.contains(&id), "token {id} never drawn");
        }
        let k2 = run(Sampling {
            top_k: 2,
            ..base.clone()
        });
        assert!(k2.iter().all(|t| *t <= 1) && k2.contains(&0) && k2.contains(&1));
        // The most likely token holds 0.29 of the mass, the first two 0.55: top_p 0.5 keeps
        // both, 0.25 only the first.
        let p = run(Sampling {
            top_p: 0.5,
            ..base.clone()
        });
        assert!(p.iter().all(|t| *t <= 1) && p.contains(&1));
        assert!(run(Sampling {
            top_p: 0.25,
            ..base.clone()
        })
        .iter()
        .all(|t| *t == 0));
        // A tiny temperature makes it greedy in effect.
        assert!(run(Sampling {
            temperature: 1e-4,
            ..base
        })
        .iter()
        .all(|t| *t == 0));
    }
}
