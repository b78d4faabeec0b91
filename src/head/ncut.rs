//! The TokenCut recipe (Wang et al., 2022): a normalized cut of the graph of
//! patches, with edges from the cosine similarity of last-layer keys.

use anyhow::{Context, Result, bail};
use faer::{Mat, Side};

use super::{HeadMap, SegmentationHead};
use crate::attention;
use crate::maps::PatchMap;
use crate::model::{Capture, EncoderOutput, Keep, Vit};
use crate::preprocess::PatchGrid;

/// TokenCut's weight for edges below the threshold: small, not zero, so the
/// graph stays connected.
const WEAK_EDGE: f64 = 1e-5;

/// Safetensors metadata key: the key similarity above which the cut links
/// two patches, for a model whose keys are more alike than DINO's.
pub const TAU_METADATA_KEY: &str = "segattn_ncut_tau";

/// TokenCut's similarity threshold, tuned on DINO's keys.
const TOKENCUT_TAU: f64 = 0.2;

#[derive(Debug, Clone)]
pub struct NormalizedCut {
    /// Edges between patches whose key similarity exceeds this.
    pub tau: f64,
}

impl NormalizedCut {
    /// With the threshold `model`'s file gives (segattn-s16's keys are more
    /// alike than DINO's), else TokenCut's.
    /// A threshold there that is not a similarity is a broken checkpoint.
    pub fn for_model(model: &Vit) -> Result<Self> {
        let Some(text) = model.metadata(TAU_METADATA_KEY) else { return Ok(Self { tau: TOKENCUT_TAU }) };
        match text.parse::<f64>() {
            Ok(tau) if (0.0..1.0).contains(&tau) => Ok(Self { tau }),
            _ => bail!(
                "{}: metadata {TAU_METADATA_KEY} is {text:?}, not a similarity in [0, 1)",
                model.files().weights.display()
            ),
        }
    }
}

/// A dense symmetric matrix, row-major.
pub struct Affinity {
    pub size: usize,
    pub weights: Vec<f64>,
}

impl Affinity {
    /// 1 where the cosine similarity of two feature rows exceeds `tau`, else a weak edge.
    pub fn from_features(features: &[Vec<f32>], tau: f64) -> Self {
        let unit: Vec<Vec<f64>> = features
            .iter()
            .map(|f| {
                let norm = f.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt().max(1e-12);
                f.iter().map(|&v| v as f64 / norm).collect()
            })
            .collect();
        let size = unit.len();
        let mut weights = vec![0.0; size * size];
        for i in 0..size {
            for j in i..size {
                let cosine: f64 = unit[i].iter().zip(&unit[j]).map(|(a, b)| a * b).sum();
                let w = if cosine > tau { 1.0 } else { WEAK_EDGE };
                weights[i * size + j] = w;
                weights[j * size + i] = w;
            }
        }
        Self { size, weights }
    }

    fn row(&self, i: usize) -> &[f64] {
        &self.weights[i * self.size..(i + 1) * self.size]
    }

    fn degrees(&self) -> Vec<f64> {
        (0..self.size).map(|i| self.row(i).iter().sum()).collect()
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn normalize(v: &mut [f64]) -> f64 {
    let norm = dot(v, v).sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    norm
}

/// The second smallest generalized eigenvector of (D - W) x = λ D x, by a
/// full dense eigendecomposition of D^-1/2 W D^-1/2. O(n³): the reference
/// that [`fiedler_vector`] is tested against.
pub fn fiedler_vector_dense(affinity: &Affinity) -> Result<Vec<f64>> {
    let n = affinity.size;
    let inv_sqrt: Vec<f64> = affinity.degrees().iter().map(|d| 1.0 / d.sqrt()).collect();
    let m = Mat::<f64>::from_fn(n, n, |i, j| inv_sqrt[i] * affinity.weights[i * n + j] * inv_sqrt[j]);
    let eigen = m.self_adjoint_eigen(Side::Lower).map_err(|e| anyhow::anyhow!("eigendecomposition failed: {e:?}"))?;
    // Eigenvalues ascend; λ of the Laplacian is 1 - μ, so the second smallest
    // λ is the second largest μ.
    let column = eigen.U().col(n - 2);
    Ok((0..n).map(|i| column[i] * inv_sqrt[i]).collect())
}

/// The same vector by Lanczos iteration on D^-1/2 W D^-1/2 with its known top
/// eigenvector (√d) deflated: only matrix-vector products, O(n²) each.
pub fn fiedler_vector(affinity: &Affinity) -> Result<Vec<f64>> {
    let n = affinity.size;
    if n < 3 {
        return fiedler_vector_dense(affinity);
    }
    let degrees = affinity.degrees();
    let inv_sqrt: Vec<f64> = degrees.iter().map(|d| 1.0 / d.sqrt()).collect();
    let mut top: Vec<f64> = degrees.iter().map(|d| d.sqrt()).collect();
    normalize(&mut top);
    let apply = |x: &[f64]| -> Vec<f64> {
        let scaled: Vec<f64> = x.iter().zip(&inv_sqrt).map(|(a, b)| a * b).collect();
        let along_top = dot(&top, x);
        (0..n).map(|i| inv_sqrt[i] * dot(affinity.row(i), &scaled) - top[i] * along_top).collect()
    };

    // A start with a component along every eigenvector, deterministic.
    let mut start: Vec<f64> = (0..n).map(|i| 1.0 + ((i * 7919) % 101) as f64 / 101.0).collect();
    let mut steps = n.min(64);
    loop {
        let (value, vector, residual) = lanczos_top(&apply, &top, &start, steps)?;
        let converged = residual <= 1e-8 * value.abs().max(1.0);
        if converged || steps == n {
            return Ok(vector.iter().zip(&inv_sqrt).map(|(y, s)| y * s).collect());
        }
        // Restart from the current best guess with a longer run.
        start = vector;
        steps = (steps * 2).min(n);
    }
}

/// `steps` Lanczos steps with full reorthogonalization (also against `top`);
/// returns the largest Ritz value, its vector and its residual norm.
fn lanczos_top(
    apply: &dyn Fn(&[f64]) -> Vec<f64>,
    top: &[f64],
    start: &[f64],
    steps: usize,
) -> Result<(f64, Vec<f64>, f64)> {
    let orthogonalize = |w: &mut Vec<f64>, basis: &[Vec<f64>]| {
        for _ in 0..2 {
            for q in basis.iter().chain(std::iter::once(&top.to_vec())) {
                let c = dot(q, w);
                w.iter_mut().zip(q).for_each(|(x, y)| *x -= c * y);
            }
        }
    };
    let mut q = start.to_vec();
    orthogonalize(&mut q, &[]);
    if normalize(&mut q) == 0.0 {
        bail!("Lanczos start vector vanished");
    }
    let mut basis = vec![q];
    let (mut alphas, mut betas) = (Vec::new(), Vec::new());
    loop {
        let current = basis.last().expect("basis starts non-empty");
        let mut w = apply(current);
        alphas.push(dot(current, &w));
        orthogonalize(&mut w, &basis);
        let beta = normalize(&mut w);
        if basis.len() == steps || beta < 1e-12 {
            betas.push(beta);
            break;
        }
        betas.push(beta);
        basis.push(w);
    }
    let k = alphas.len();
    let tridiagonal = Mat::<f64>::from_fn(k, k, |i, j| match i.abs_diff(j) {
        0 => alphas[i],
        1 => betas[i.min(j)],
        _ => 0.0,
    });
    let eigen = tridiagonal
        .self_adjoint_eigen(Side::Lower)
        .map_err(|e| anyhow::anyhow!("tridiagonal eigendecomposition failed: {e:?}"))?;
    let s = eigen.U().col(k - 1);
    let value = eigen.S().column_vector()[k - 1];
    let mut vector = vec![0.0; top.len()];
    for (j, q) in basis.iter().enumerate() {
        vector.iter_mut().zip(q).for_each(|(v, x)| *v += s[j] * x);
    }
    let residual = (betas[k - 1] * s[k - 1]).abs();
    Ok((value, vector, residual))
}

/// TokenCut's bipartition: a side of the mean, reduced to its 4-connected
/// component around its entry of largest magnitude. The side is TokenCut's,
/// the one holding the largest entry overall, unless `looks` (the class
/// token's attention per patch) is given: then the side it attends to more,
/// per patch. A model trained to look at the object (segattn-s16) can put
/// the larger entries on the background, and the class token settles it.
pub fn foreground_component(vector: &[f64], grid: PatchGrid, looks: Option<&[f32]>) -> Vec<bool> {
    let mean = vector.iter().sum::<f64>() / vector.len() as f64;
    let largest_on = |side: Option<bool>| {
        (0..vector.len())
            .filter(|&i| side.is_none_or(|above| (vector[i] > mean) == above))
            .max_by(|&a, &b| vector[a].abs().total_cmp(&vector[b].abs()))
    };
    let seed_side = match looks {
        Some(looks) => {
            let share = |above: bool| {
                let (sum, count) = (0..vector.len())
                    .filter(|&i| (vector[i] > mean) == above)
                    .fold((0.0, 0usize), |(s, n), i| (s + f64::from(looks[i]), n + 1));
                if count == 0 { f64::NEG_INFINITY } else { sum / count as f64 }
            };
            share(true) >= share(false)
        }
        None => largest_on(None).is_none_or(|i| vector[i] > mean),
    };
    let seed = largest_on(Some(seed_side)).or(largest_on(None)).unwrap_or(0);
    let seed_side = vector[seed] > mean;
    let side: Vec<bool> = vector.iter().map(|&v| (v > mean) == seed_side).collect();
    let mut component = vec![false; vector.len()];
    let mut stack = vec![seed];
    component[seed] = true;
    while let Some(i) = stack.pop() {
        let (row, col) = (i / grid.cols, i % grid.cols);
        let neighbours = [
            (row > 0).then(|| i - grid.cols),
            (row + 1 < grid.rows).then(|| i + grid.cols),
            (col > 0).then(|| i - 1),
            (col + 1 < grid.cols).then(|| i + 1),
        ];
        for j in neighbours.into_iter().flatten() {
            if side[j] && !component[j] {
                component[j] = true;
                stack.push(j);
            }
        }
    }
    component
}

impl SegmentationHead for NormalizedCut {
    fn capture(&self, model: &Vit) -> Capture {
        let last = model.config().num_layers - 1;
        Capture::attention([last], Keep::ClsRow).and_qkv(last)
    }

    fn predict(&self, _model: &Vit, out: &EncoderOutput) -> Result<HeadMap> {
        let qkv = out.qkv.as_ref().context("keys of the last layer were not captured")?;
        // (1, heads, tokens, head_dim) -> patch rows of all heads' keys.
        let keys = qkv.keys.get(0)?.transpose(0, 1)?.flatten_from(1)?;
        let patches = keys.narrow(0, out.num_prefix_tokens, out.grid.len())?;
        let affinity = Affinity::from_features(&patches.to_vec2::<f32>()?, self.tau);
        let vector = fiedler_vector(&affinity)?;
        let looks = attention::mean_map(&attention::cls_attention(out, qkv.layer)?)?;
        let foreground = foreground_component(&vector, out.grid, Some(&looks.values));
        let values = foreground.into_iter().map(|f| if f { 1.0 } else { 0.0 }).collect();
        Ok(HeadMap::probability(PatchMap::new(out.grid, values)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Features of two clusters: `left` patches near one direction, the rest near another.
    fn two_clusters(grid: PatchGrid, is_object: impl Fn(usize, usize) -> bool) -> Vec<Vec<f32>> {
        (0..grid.len())
            .map(|i| {
                let (r, c) = (i / grid.cols, i % grid.cols);
                let jitter = ((i * 37) % 11) as f32 * 0.01;
                if is_object(r, c) { vec![1.0, jitter, 0.1] } else { vec![jitter, 1.0, -0.1] }
            })
            .collect()
    }

    #[test]
    fn lanczos_matches_the_dense_eigenvector() {
        let grid = PatchGrid { rows: 6, cols: 7 };
        let features: Vec<Vec<f32>> =
            (0..grid.len()).map(|i| (0..5).map(|k| ((i * 13 + k * 29) % 17) as f32 / 17.0 - 0.4).collect()).collect();
        let affinity = Affinity::from_features(&features, 0.2);
        let dense = fiedler_vector_dense(&affinity).unwrap();
        let lanczos = fiedler_vector(&affinity).unwrap();
        // Same vector up to sign and scale.
        let cosine = dot(&dense, &lanczos) / (dot(&dense, &dense).sqrt() * dot(&lanczos, &lanczos).sqrt());
        assert!((cosine.abs() - 1.0).abs() < 1e-8, "cosine {cosine}");
    }

    #[test]
    fn cut_separates_two_clusters_and_keeps_the_seed_component() {
        let grid = PatchGrid { rows: 5, cols: 8 };
        // A 3x3 object in a field of background.
        let object = |r: usize, c: usize| (1..4).contains(&r) && (2..5).contains(&c);
        let affinity = Affinity::from_features(&two_clusters(grid, object), 0.2);
        let vector = fiedler_vector(&affinity).unwrap();
        let foreground = foreground_component(&vector, grid, None);
        let expected: Vec<bool> = (0..grid.len()).map(|i| object(i / grid.cols, i % grid.cols)).collect();
        // The smaller cluster has the largest-magnitude entries: it is the foreground.
        assert_eq!(foreground, expected);
        // Where the class token looks decides the side instead: on the background, the
        // cut's other side (its largest component) comes back.
        let looks: Vec<f32> = expected.iter().map(|&o| if o { 0.001 } else { 0.03 }).collect();
        let flipped = foreground_component(&vector, grid, Some(&looks));
        assert!(flipped.iter().zip(&expected).all(|(f, e)| !(f & e)), "{flipped:?}");
        assert!(flipped.iter().filter(|&&f| f).count() > 20);
        let looks: Vec<f32> = expected.iter().map(|&o| if o { 0.05 } else { 0.01 }).collect();
        assert_eq!(foreground_component(&vector, grid, Some(&looks)), expected);
    }

    #[test]
    fn component_drops_disconnected_islands() {
        let grid = PatchGrid { rows: 3, cols: 5 };
        // The seed (largest |v|) at index 0; an island at index 4 on the same side.
        let vector = [5.0, 1.0, -1.0, -1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0];
        let foreground = foreground_component(&vector, grid, None);
        let kept: Vec<usize> = (0..15).filter(|&i| foreground[i]).collect();
        assert_eq!(kept, vec![0, 1, 5]);
    }
}
