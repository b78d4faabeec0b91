//! The DINO recipe: in each head of the last layer, the patches holding a
//! given share of the class token's attention; heads then vote.

use anyhow::{Result, bail};

use super::{HeadMap, SegmentationHead};
use crate::attention::cls_attention;
use crate::maps::PatchMap;
use crate::model::{Capture, EncoderOutput, Keep, Vit};

#[derive(Debug, Clone)]
pub struct AttentionMass {
    /// Share of each head's attention mass to keep (DINO's `threshold`, 0.6).
    mass: f32,
    /// Heads that must keep a patch for it to be foreground; default: half, rounded up.
    min_heads: Option<usize>,
}

impl Default for AttentionMass {
    fn default() -> Self {
        Self { mass: 0.6, min_heads: None }
    }
}

impl AttentionMass {
    /// Keeps `mass` (above 0, at most 1: none kept is no mask) of each
    /// head's attention, and wants `min_heads` (at least 1; at most the
    /// model's heads, checked when it runs) to agree on a patch.
    pub fn new(mass: f32, min_heads: Option<usize>) -> Result<Self> {
        if !(mass > 0.0 && mass <= 1.0) {
            bail!("the attention mass to keep must be above 0 and at most 1, got {mass}");
        }
        if min_heads == Some(0) {
            bail!("at least one attention head must keep a patch");
        }
        Ok(Self { mass, min_heads })
    }
}

/// Which patches hold the top `mass` share of `attention`, exactly as DINO's
/// `visualize_attention.py`: sort ascending, keep where the cumulative
/// normalized mass exceeds `1 - mass`.
pub fn mass_keep(attention: &[f32], mass: f32) -> Vec<bool> {
    let total: f32 = attention.iter().sum();
    let mut order: Vec<usize> = (0..attention.len()).collect();
    order.sort_by(|&a, &b| attention[a].total_cmp(&attention[b]));
    let mut keep = vec![false; attention.len()];
    let mut cumulative = 0.0;
    for index in order {
        cumulative += attention[index] / total;
        keep[index] = cumulative > 1.0 - mass;
    }
    keep
}

impl SegmentationHead for AttentionMass {
    fn capture(&self, model: &Vit) -> Capture {
        Capture::attention([model.config().num_layers - 1], Keep::ClsRow)
    }

    fn predict(&self, model: &Vit, out: &EncoderOutput) -> Result<HeadMap> {
        let heads = cls_attention(out, model.config().num_layers - 1)?;
        let num_heads = heads.len();
        let min_heads = self.min_heads.unwrap_or(num_heads.div_ceil(2));
        if min_heads > num_heads {
            bail!("{min_heads} attention heads cannot agree: the model has {num_heads}");
        }
        let mut votes = vec![0usize; out.grid.len()];
        for head in &heads {
            for (vote, kept) in votes.iter_mut().zip(mass_keep(&head.values, self.mass)) {
                *vote += kept as usize;
            }
        }
        let probabilities = votes.into_iter().map(|v| vote_probability(v, min_heads, num_heads)).collect();
        Ok(HeadMap::probability(PatchMap::new(out.grid, probabilities)?))
    }
}

/// Maps a vote count to [0, 1], piecewise linear, so that exactly
/// `min_heads` votes lands on the common 0.5 threshold.
fn vote_probability(votes: usize, min_heads: usize, num_heads: usize) -> f32 {
    if votes >= num_heads {
        1.0
    } else if votes <= min_heads {
        0.5 * votes as f32 / min_heads as f32
    } else {
        0.5 + 0.5 * (votes - min_heads) as f32 / (num_heads - min_heads) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_smallest_set_holding_the_mass() {
        // Shares 0.5, 0.3, 0.1, 0.1: 60 % needs the two largest patches.
        let attention = [0.1, 0.5, 0.1, 0.3];
        assert_eq!(mass_keep(&attention, 0.6), vec![false, true, false, true]);
        // 45 % is held by the largest patch alone.
        assert_eq!(mass_keep(&attention, 0.45), vec![false, true, false, false]);
        assert_eq!(mass_keep(&attention, 1.0), vec![true; 4]);
        // Unnormalized input gives the same answer.
        assert_eq!(mass_keep(&[1.0, 5.0, 1.0, 3.0], 0.6), vec![false, true, false, true]);
    }

    #[test]
    fn a_mass_or_a_vote_that_keeps_nothing_is_refused() {
        for mass in [0.0, -0.1, 1.5, f32::NAN] {
            assert!(AttentionMass::new(mass, None).is_err(), "{mass}");
        }
        assert!(AttentionMass::new(0.6, Some(0)).is_err());
        assert!(AttentionMass::new(1.0, Some(1)).is_ok());
    }

    #[test]
    fn votes_map_min_heads_to_one_half() {
        assert_eq!(vote_probability(0, 3, 6), 0.0);
        assert_eq!(vote_probability(3, 3, 6), 0.5);
        assert_eq!(vote_probability(6, 3, 6), 1.0);
        assert!(vote_probability(2, 3, 6) < 0.5);
        assert_eq!(vote_probability(1, 1, 1), 1.0);
    }
}
