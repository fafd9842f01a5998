//! Token sampling for generation: a policy (what to sample) separate from the generator state.

use rand::Rng;

/// Policy for choosing the next token from the logits.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingPolicy {
    /// Softmax temperature; 0 means greedy (argmax).
    pub temperature: f64,
    /// Keep only the `k` most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `p` (1.0: all).
    pub top_p: f64,
}

impl Default for SamplingPolicy {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0 }
    }
}

impl SamplingPolicy {
    /// Picks a token id from one row of logits.
    pub fn sample(&self, logits: &[f32], rng: &mut impl Rng) -> usize {
        if self.temperature <= 0.0 {
            return argmax(logits);
        }

        // Candidates by descending logit, cut to the top k.
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        if self.top_k > 0 {
            order.truncate(self.top_k);
        }

        let max = logits[order[0]] as f64;
        let mut probs: Vec<f64> = order
            .iter()
            .map(|&i| ((logits[i] as f64 - max) / self.temperature).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);

        // Nucleus: keep the smallest prefix whose probability reaches top_p.
        if self.top_p < 1.0 {
            let mut cumulative = 0.0;
            let keep = probs
                .iter()
                .position(|p| {
                    cumulative += p;
                    cumulative >= self.top_p
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
            order.truncate(keep);
        }

        let total: f64 = probs.iter().sum();
        let mut draw = rng.random::<f64>() * total;
        for (&token, &p) in order.iter().zip(&probs) {
            if draw < p {
                return token;
            }
            draw -= p;
        }
        *order.last().expect("at least one candidate")
    }
}

/// Returns the index of the largest value (the first on ties).
pub fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn greedy_takes_argmax() {
        let mut rng = StdRng::seed_from_u64(0);
        assert_eq!(SamplingPolicy::default().sample(&[0.1, 3.0, 2.0], &mut rng), 1);
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut rng = StdRng::seed_from_u64(0);
        let policy = SamplingPolicy { temperature: 1.0, top_k: 1, top_p: 1.0 };
        for _ in 0..20 {
            assert_eq!(policy.sample(&[0.1, 3.0, 2.9], &mut rng), 1);
        }
    }

    #[test]
    fn top_p_drops_unlikely_tokens() {
        let mut rng = StdRng::seed_from_u64(0);
        let policy = SamplingPolicy { temperature: 1.0, top_k: 0, top_p: 0.5 };
        for _ in 0..50 {
            assert_eq!(policy.sample(&[10.0, 0.0, 0.0, 0.0], &mut rng), 0);
        }
    }
}
