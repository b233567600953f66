//! Classification post-processing: probabilities, top-k, and the OK / NG verdict.

use serde::Serialize;

use crate::manifest::{Decode, OutputSpec, VerdictRule};

/// The inspection outcome for one part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Verdict {
    /// Part is good.
    #[serde(rename = "OK")]
    Ok,
    /// Part is rejected.
    #[serde(rename = "NG")]
    Ng,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verdict::Ok => "OK",
            Verdict::Ng => "NG",
        })
    }
}

/// A label and its probability.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassScore {
    /// Class label.
    pub label: String,
    /// Probability in 0..=1.
    pub probability: f32,
}

/// Numerically stable softmax.
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|x| (x - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    exp.into_iter().map(|e| e / sum).collect()
}

/// Turns one sample's raw output into per-class probabilities.
pub fn probabilities(decode: Decode, raw: &[f32]) -> Vec<f32> {
    match decode {
        Decode::Probabilities => raw.to_vec(),
        Decode::Logits => softmax(raw),
        Decode::Sigmoid => raw.iter().map(|x| 1.0 / (1.0 + (-x).exp())).collect(),
    }
}

/// All classes sorted by probability, highest first (ties keep label order).
pub fn ranked(output: &OutputSpec, probs: &[f32]) -> Vec<ClassScore> {
    let mut scores: Vec<ClassScore> = output
        .labels
        .iter()
        .zip(probs)
        .map(|(label, &probability)| ClassScore {
            label: label.clone(),
            probability,
        })
        .collect();
    scores.sort_by(|a, b| b.probability.total_cmp(&a.probability));
    scores
}

/// Applies the verdict rule: NG with the reason when any listed label reaches its threshold.
pub fn verdict(
    rule: &VerdictRule,
    output: &OutputSpec,
    probs: &[f32],
) -> (Verdict, Option<String>) {
    let mut hits: Vec<(f32, String)> = rule
        .ng
        .iter()
        .filter_map(|(label, &min)| {
            let i = output.labels.iter().position(|l| l == label)?;
            (probs[i] >= min).then(|| (probs[i], format!("{label} {:.3} >= {min}", probs[i])))
        })
        .collect();
    hits.sort_by(|a, b| b.0.total_cmp(&a.0));
    match hits.into_iter().next() {
        Some((_, reason)) => (Verdict::Ng, Some(reason)),
        None => (Verdict::Ok, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn output() -> OutputSpec {
        OutputSpec {
            tensor: "p".into(),
            decode: Decode::Probabilities,
            labels: vec!["ok".into(), "scratch".into(), "dent".into()],
        }
    }

    #[test]
    fn softmax_is_stable_and_sums_to_one() {
        let p = softmax(&[1000.0, 1000.0, -1000.0]);
        assert!((p[0] - 0.5).abs() < 1e-6 && p[2] == 0.0);
        assert!((softmax(&[0.1, 2.0, -1.0]).iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn verdict_uses_per_label_thresholds() {
        let rule = VerdictRule {
            ng: BTreeMap::from([("scratch".into(), 0.6), ("dent".into(), 0.3)]),
        };
        assert_eq!(verdict(&rule, &output(), &[0.5, 0.45, 0.05]).0, Verdict::Ok);
        let (v, why) = verdict(&rule, &output(), &[0.3, 0.35, 0.35]);
        assert_eq!(
            (v, why.as_deref()),
            (Verdict::Ng, Some("dent 0.350 >= 0.3"))
        );
        assert_eq!(
            verdict(&rule, &output(), &[0.0, 0.6, 0.0]).0,
            Verdict::Ng,
            "threshold is inclusive"
        );
        assert_eq!(ranked(&output(), &[0.2, 0.7, 0.1])[0].label, "scratch");
    }
}
