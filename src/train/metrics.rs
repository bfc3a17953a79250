//! Evaluation metrics: top-k accuracy, confusion matrix, mIoU and pixel accuracy.

use serde::Serialize;

/// A confusion matrix `counts[true][predicted]` (ignored targets are not counted).
#[derive(Debug, Clone, Serialize)]
pub struct ConfusionMatrix {
    pub num_classes: usize,
    pub counts: Vec<Vec<u64>>,
}

impl ConfusionMatrix {
    pub fn new(num_classes: usize) -> Self {
        Self {
            num_classes,
            counts: vec![vec![0; num_classes]; num_classes],
        }
    }

    pub fn add(&mut self, target: usize, predicted: usize) {
        if target < self.num_classes && predicted < self.num_classes {
            self.counts[target][predicted] += 1;
        }
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().flatten().sum()
    }

    /// Fraction of correct predictions (top-1 / pixel accuracy).
    pub fn accuracy(&self) -> f64 {
        let correct: u64 = (0..self.num_classes).map(|i| self.counts[i][i]).sum();
        correct as f64 / self.total().max(1) as f64
    }

    /// Per-class IoU, `None` for classes absent from both targets and predictions
    /// (mmseg's convention: they are left out of the mean).
    pub fn iou(&self) -> Vec<Option<f64>> {
        (0..self.num_classes)
            .map(|c| {
                let tp = self.counts[c][c];
                let fn_: u64 = self.counts[c].iter().sum::<u64>() - tp;
                let fp: u64 = (0..self.num_classes)
                    .map(|r| self.counts[r][c])
                    .sum::<u64>()
                    - tp;
                let union = tp + fn_ + fp;
                (union > 0).then(|| tp as f64 / union as f64)
            })
            .collect()
    }

    /// Mean IoU over the classes present.
    pub fn mean_iou(&self) -> f64 {
        let v: Vec<f64> = self.iou().into_iter().flatten().collect();
        if v.is_empty() {
            0.0
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    }

    /// Per-class recall (accuracy of each true class).
    pub fn class_accuracy(&self) -> Vec<Option<f64>> {
        self.counts
            .iter()
            .enumerate()
            .map(|(c, row)| {
                let n: u64 = row.iter().sum();
                (n > 0).then(|| row[c] as f64 / n as f64)
            })
            .collect()
    }

    /// The matrix as aligned text, with class names.
    pub fn to_text(&self, names: &[String]) -> String {
        // Rows: "k name" (true class); columns: the class number k (predicted), so that every
        // column has a name without making the table as wide as the names.
        let n = self.counts.len();
        let label = |i: usize| -> String {
            let name: String = names
                .get(i)
                .map(|n| n.chars().take(20).collect())
                .unwrap_or_else(|| format!("LABEL_{i}"));
            format!("{i} {name}")
        };
        let w = (0..n)
            .map(|i| label(i).chars().count())
            .max()
            .unwrap_or(4)
            .max("true \\ predicted".len());
        let cell = self
            .counts
            .iter()
            .flatten()
            .max()
            .map(|m| m.to_string().len())
            .unwrap_or(1)
            .max(n.saturating_sub(1).to_string().len())
            .max(3);
        let mut s = format!("{:<w$} |", "true \\ predicted");
        for j in 0..n {
            s.push_str(&format!(" {j:>cell$}"));
        }
        s.push('\n');
        for (i, row) in self.counts.iter().enumerate() {
            s.push_str(&format!("{:<w$} |", label(i)));
            for v in row {
                s.push_str(&format!(" {v:>cell$}"));
            }
            s.push('\n');
        }
        s
    }
}

/// Count of samples whose target is among the `k` highest logits.
pub fn topk_correct(logits: &[f32], num_classes: usize, targets: &[usize], k: usize) -> usize {
    logits
        .chunks(num_classes)
        .zip(targets)
        .filter(|(row, &t)| {
            let v = row[t];
            // rank = number of strictly larger logits (ties count in the sample's favour, as torch.topk)
            row.iter().filter(|&&x| x > v).count() < k
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn miou_and_accuracy() {
        let mut m = ConfusionMatrix::new(3);
        for (t, p) in [(0, 0), (0, 0), (0, 1), (1, 1), (2, 2), (2, 0)] {
            m.add(t, p);
        }
        assert!((m.accuracy() - 4.0 / 6.0).abs() < 1e-12);
        let iou = m.iou();
        // class 0: tp 2, fn 1, fp 1 -> 0.5; class 1: tp 1, fn 0, fp 1 -> 0.5; class 2: tp 1, fn 1, fp 0 -> 0.5
        for v in iou {
            assert!((v.unwrap() - 0.5).abs() < 1e-12);
        }
        assert!((m.mean_iou() - 0.5).abs() < 1e-12);
    }

    #[test]
    fn topk() {
        let logits = [0.1, 0.5, 0.4, /* */ 0.9, 0.05, 0.05];
        assert_eq!(topk_correct(&logits, 3, &[2, 0], 1), 1);
        assert_eq!(topk_correct(&logits, 3, &[2, 0], 2), 2);
    }
}
