//! The standard salient-object metrics: IoU of the binary mask, F-measure
//! over the thresholds of the soft map, mean absolute error.

/// β² = 0.3 weighs precision over recall, as every salient-object benchmark does.
pub const BETA_SQUARED: f64 = 0.3;
pub const THRESHOLDS: usize = 256;

/// Scores of one image.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageScores {
    pub iou: f64,
    pub mae: f64,
    /// Precision and recall at each threshold t = 0..255 of the soft map
    /// quantized to 8 bits (foreground where value >= t).
    pub precision: Vec<f64>,
    pub recall: Vec<f64>,
}

impl ImageScores {
    /// The best F-measure of this image alone.
    pub fn max_f(&self) -> f64 {
        max_f(&self.precision, &self.recall)
    }
}

fn f_measure(precision: f64, recall: f64) -> f64 {
    let denominator = BETA_SQUARED * precision + recall;
    if denominator == 0.0 { 0.0 } else { (1.0 + BETA_SQUARED) * precision * recall / denominator }
}

/// The largest F-measure along a precision/recall curve.
pub fn max_f(precision: &[f64], recall: &[f64]) -> f64 {
    precision.iter().zip(recall).map(|(&p, &r)| f_measure(p, r)).fold(0.0, f64::max)
}

/// Scores `soft` (foreground probability per pixel, [0, 1]) against `truth`
/// (true = object), with `threshold` making the binary mask.
///
/// Empty cases: predicting nothing where there is nothing is perfect
/// (IoU 1, precision 1, recall 1); predicting nothing has precision 1, and
/// an empty ground truth has recall 1, so a miss or a false alarm scores F 0.
pub fn score(soft: &[f32], truth: &[bool], threshold: f32) -> ImageScores {
    assert_eq!(soft.len(), truth.len(), "map and ground truth differ in size");
    let (mut intersection, mut union) = (0u64, 0u64);
    let mut absolute_error = 0f64;
    let mut object_hist = [0u64; THRESHOLDS];
    let mut background_hist = [0u64; THRESHOLDS];
    for (&p, &t) in soft.iter().zip(truth) {
        let predicted = p >= threshold;
        intersection += (predicted && t) as u64;
        union += (predicted || t) as u64;
        absolute_error += (p as f64 - if t { 1.0 } else { 0.0 }).abs();
        let level = (p.clamp(0.0, 1.0) * 255.0).round() as usize;
        if t { object_hist[level] += 1 } else { background_hist[level] += 1 }
    }
    let objects: u64 = object_hist.iter().sum();
    let (mut precision, mut recall) = (vec![0.0; THRESHOLDS], vec![0.0; THRESHOLDS]);
    let (mut true_positives, mut false_positives) = (0u64, 0u64);
    // From the highest threshold down, so counts accumulate `value >= t`.
    for t in (0..THRESHOLDS).rev() {
        true_positives += object_hist[t];
        false_positives += background_hist[t];
        let predicted = true_positives + false_positives;
        precision[t] = if predicted == 0 { 1.0 } else { true_positives as f64 / predicted as f64 };
        recall[t] = if objects == 0 { 1.0 } else { true_positives as f64 / objects as f64 };
    }
    ImageScores {
        iou: if union == 0 { 1.0 } else { intersection as f64 / union as f64 },
        mae: absolute_error / soft.len().max(1) as f64,
        precision,
        recall,
    }
}

/// Dataset summary: mean IoU, max F of the mean precision/recall curve, mean MAE.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub images: usize,
    pub mean_iou: f64,
    pub max_f: f64,
    pub mae: f64,
}

pub fn summarize(scores: &[ImageScores]) -> Summary {
    let n = scores.len().max(1) as f64;
    let mean_curve = |pick: fn(&ImageScores) -> &Vec<f64>| -> Vec<f64> {
        (0..THRESHOLDS).map(|t| scores.iter().map(|s| pick(s)[t]).sum::<f64>() / n).collect()
    };
    Summary {
        images: scores.len(),
        mean_iou: scores.iter().map(|s| s.iou).sum::<f64>() / n,
        max_f: if scores.is_empty() { 0.0 } else { max_f(&mean_curve(|s| &s.precision), &mean_curve(|s| &s.recall)) },
        mae: scores.iter().map(|s| s.mae).sum::<f64>() / n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iou_and_mae_by_hand() {
        // truth: 1 1 0 0; prediction at 0.5: 1 0 1 0 -> IoU 1/3.
        let s = score(&[0.9, 0.2, 0.6, 0.0], &[true, true, false, false], 0.5);
        assert!((s.iou - 1.0 / 3.0).abs() < 1e-12);
        // |0.9-1| + |0.2-1| + |0.6-0| + 0 = 0.1 + 0.8 + 0.6 = 1.5, over 4.
        assert!((s.mae - 0.375).abs() < 1e-6);
    }

    #[test]
    fn f_measure_curve_by_hand() {
        // Levels 255, 153, 51, 0 for truth 1, 0, 1, 0.
        let s = score(&[1.0, 0.6, 0.2, 0.0], &[true, false, true, false], 0.5);
        // t = 200: only the 255 pixel -> precision 1, recall 1/2.
        assert_eq!((s.precision[200], s.recall[200]), (1.0, 0.5));
        // t = 100: 255 and 153 -> precision 1/2, recall 1/2.
        assert_eq!((s.precision[100], s.recall[100]), (0.5, 0.5));
        // t = 40: three pixels, two true -> precision 2/3, recall 1.
        assert!((s.precision[40] - 2.0 / 3.0).abs() < 1e-12 && s.recall[40] == 1.0);
        // t = 0: everything -> precision 1/2, recall 1.
        assert_eq!((s.precision[0], s.recall[0]), (0.5, 1.0));
        // Best: P=1, R=1/2 gives 1.3 * 0.5 / (0.3 + 0.5) = 0.8125; P=2/3, R=1
        // gives 1.3 * (2/3) / (0.2 + 1) = 0.7222.
        assert!((s.max_f() - 0.8125).abs() < 1e-12);
    }

    #[test]
    fn all_background_edge_cases() {
        // Nothing there, nothing predicted at any threshold above 0: perfect.
        let s = score(&[0.0, 0.0], &[false, false], 0.5);
        assert_eq!((s.iou, s.mae), (1.0, 0.0));
        assert_eq!(s.max_f(), 1.0);
        // Nothing there, something predicted everywhere: F 0 at every threshold but
        // the ones above it, where nothing is predicted.
        let s = score(&[1.0, 1.0], &[false, false], 0.5);
        assert_eq!((s.iou, s.mae), (0.0, 1.0));
        assert_eq!(s.precision[255], 0.0);
        // An object missed entirely: recall 0 at every threshold above 0.
        let s = score(&[0.0, 0.0], &[true, false], 0.5);
        assert_eq!(s.iou, 0.0);
        assert_eq!(s.recall[1], 0.0);
        assert!((s.max_f() - f_measure(0.5, 1.0)).abs() < 1e-12, "only t = 0 (everything) finds it");
    }

    #[test]
    fn summary_averages_curves_before_taking_the_max() {
        let a = score(&[1.0, 0.0], &[true, false], 0.5);
        let b = score(&[0.0, 1.0], &[true, false], 0.5);
        let summary = summarize(&[a.clone(), b]);
        assert_eq!(summary.images, 2);
        assert!((summary.mean_iou - 0.5).abs() < 1e-12);
        assert!((summary.mae - 0.5).abs() < 1e-12);
        assert!(summary.max_f < a.max_f());
        assert_eq!(summarize(&[]).images, 0);
    }
}
