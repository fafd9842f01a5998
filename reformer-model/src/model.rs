//! The Reformer language model: embeddings, reversible layers, final LayerNorm and LM head.

use burn::module::Module;
use burn::nn::{LayerNorm, LayerNormConfig, Linear};
use burn::prelude::*;
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::attention::local::LocalSelfAttention;
use crate::attention::lsh::LshSelfAttention;
use crate::config::{AttentionKind, ReformerConfig};
use crate::context::{ForwardContext, KeyMask, LshMode, RandomSite};
use crate::embeddings::Embeddings;
use crate::error::{ConfigError, InputError};
use crate::feed_forward::FeedForward;
use crate::init::normal_linear;
use crate::{linear, norm};
use crate::reversible::reversible_layers;

/// Index used for the random streams of the final LayerNorm's dropout, after every layer's.
const FINAL_NORM_STREAM: usize = usize::MAX;

/// `Attn(z) = dropout(W_o SelfAttn(LN(z)))`, with LSH or local self-attention.
#[derive(Module, Debug)]
pub struct AttentionBlock {
    /// LayerNorm before attention.
    pub layer_norm: LayerNorm,
    /// LSH self-attention, for an `lsh` layer.
    pub lsh: Option<LshSelfAttention>,
    /// Local self-attention, for a `local` layer.
    pub local: Option<LocalSelfAttention>,
    /// Output projection `W_o`, `n_heads * d_head -> d_model`, no bias.
    pub output: Linear,
    /// Dropout probability after `W_o` (`hidden_dropout_prob`).
    pub dropout: f64,
    /// Epsilon of `layer_norm` (`layer_norm_eps`).
    #[module(skip)]
    layer_norm_eps: f64,
}

impl AttentionBlock {
    fn new(kind: AttentionKind, config: &ReformerConfig, rng: &mut StdRng, device: &Device) -> Self {
        Self {
            layer_norm: LayerNormConfig::new(config.hidden_size)
                .with_epsilon(config.layer_norm_eps)
                .init(device),
            lsh: (kind == AttentionKind::Lsh).then(|| LshSelfAttention::new(config, rng, device)),
            local: (kind == AttentionKind::Local).then(|| LocalSelfAttention::new(config, rng, device)),
            output: normal_linear(config.all_head_size(), config.hidden_size, false, config.initializer_range, rng, device),
            dropout: config.hidden_dropout_prob,
            layer_norm_eps: config.layer_norm_eps,
        }
    }

    /// Runs the block. An LSH block returns zeros under [`LshMode::Ablated`], so that the
    /// residual stream passes through the layer unchanged.
    ///
    /// # Shapes
    /// - `z`: `[batch_size, seq_len, d_model]`
    /// - output: `[batch_size, seq_len, d_model]`
    pub fn forward(
        &self,
        z: Tensor<3>,
        mask: Option<&KeyMask>,
        layer: usize,
        ctx: &ForwardContext,
    ) -> Result<Tensor<3>, InputError> {
        if self.lsh.is_some() && ctx.lsh_mode == LshMode::Ablated {
            return Ok(z.zeros_like());
        }
        self.forward_normed(self.normalise(z), mask, layer, ctx)
    }

    /// Applies the block's LayerNorm.
    ///
    /// # Shapes
    /// - `z`, output: `[batch_size, seq_len, d_model]`
    pub fn normalise(&self, z: Tensor<3>) -> Tensor<3> {
        norm::forward(&self.layer_norm, self.layer_norm_eps, z)
    }

    /// Runs the block on input already normalised by its LayerNorm (ablation is the caller's).
    ///
    /// # Shapes
    /// - `normed`: `[batch_size, seq_len, d_model]`
    /// - output: `[batch_size, seq_len, d_model]`
    pub fn forward_normed(
        &self,
        normed: Tensor<3>,
        mask: Option<&KeyMask>,
        layer: usize,
        ctx: &ForwardContext,
    ) -> Result<Tensor<3>, InputError> {
        let heads = match (&self.lsh, &self.local) {
            (Some(lsh), _) => lsh.forward(normed, mask, layer, ctx)?,
            (None, Some(local)) => local.forward(normed, mask, layer, ctx),
            (None, None) => unreachable!("an attention block has an LSH or a local attention"),
        };
        let out = linear::forward(&self.output, heads);
        Ok(ctx.dropout(out, self.dropout, layer, RandomSite::AttentionOutput))
    }
}

/// One reversible layer: `U <- U + Attn(Z)`, then `Z <- Z + FF(U)`.
#[derive(Module, Debug)]
pub struct ReformerLayer {
    /// Attention block, added to the `U` stream.
    pub attention: AttentionBlock,
    /// Feed-forward block, added to the `Z` stream.
    pub feed_forward: FeedForward,
}

impl ReformerLayer {
    /// Applies the layer to the two streams `(u, z)`.
    ///
    /// # Shapes
    /// - `u`, `z`, outputs: `[batch_size, seq_len, d_model]`
    pub fn forward(
        &self,
        u: Tensor<3>,
        z: Tensor<3>,
        mask: Option<&KeyMask>,
        layer: usize,
        ctx: &ForwardContext,
    ) -> Result<(Tensor<3>, Tensor<3>), InputError> {
        let u = u + self.attention.forward(z.clone(), mask, layer, ctx)?;
        let z = z + self.feed_forward.forward(u.clone(), layer, ctx);
        Ok((u, z))
    }

    /// Reconstructs the layer's inputs from its outputs: `Z = Z' - FF(U')`, then
    /// `U = U' - Attn(Z)`. Exact up to rounding when `ctx` replays the forward's randomness.
    pub fn inverse(
        &self,
        u_out: Tensor<3>,
        z_out: Tensor<3>,
        mask: Option<&KeyMask>,
        layer: usize,
        ctx: &ForwardContext,
    ) -> Result<(Tensor<3>, Tensor<3>), InputError> {
        let z = z_out - self.feed_forward.forward(u_out.clone(), layer, ctx);
        let u = u_out - self.attention.forward(z.clone(), mask, layer, ctx)?;
        Ok((u, z))
    }
}

/// Runs `layers` on `x` (both streams start as `x`) and returns `concat(U, Z)`.
///
/// # Shapes
/// - `x`: `[batch_size, seq_len, d_model]`
/// - output: `[batch_size, seq_len, 2 * d_model]`
pub(crate) fn run_layers(
    layers: &[ReformerLayer],
    x: Tensor<3>,
    mask: Option<&KeyMask>,
    ctx: &ForwardContext,
) -> Result<Tensor<3>, InputError> {
    let mut u = x.clone();
    let mut z = x;
    for (index, layer) in layers.iter().enumerate() {
        (u, z) = layer.forward(u, z, mask, index, ctx)?;
    }
    Ok(Tensor::cat(vec![u, z], 2))
}

/// Reformer language model with an LM head (`ReformerModelWithLMHead` when `is_decoder`,
/// `ReformerForMaskedLM` otherwise).
#[derive(Module, Debug)]
pub struct ReformerLm {
    /// Token and position embeddings.
    pub embeddings: Embeddings,
    /// Reversible layers, in `attn_layers` order.
    pub layers: Vec<ReformerLayer>,
    /// Final LayerNorm over `concat(U, Z)`, width `2 * d_model`.
    pub layer_norm: LayerNorm,
    /// Output projection `2 * d_model -> vocab_size`, with bias.
    pub lm_head: Linear,
    #[module(skip)]
    config: ReformerConfig,
}

impl ReformerLm {
    /// Validates the config and creates a model on `device` with weights drawn from a host
    /// generator seeded with `seed`: the same seed gives the same weights on every backend.
    pub fn new(config: &ReformerConfig, seed: u64, device: &Device) -> Result<Self, ConfigError> {
        config.validate()?;
        // Weights are drawn on the host and then copied to the device: two copies at once.
        let parameters = crate::memory::parameter_count(config);
        crate::memory::check_fits(
            2.0 * 4.0 * parameters,
            || format!("a model of {parameters:.3e} parameters (hidden_size {}, vocab_size {}, {} layers)", config.hidden_size, config.vocab_size, config.num_layers()),
            || "lower hidden_size, feed_forward_size, vocab_size or the number of layers".to_string(),
        )?;
        let d_model = config.hidden_size;
        let mut rng = StdRng::seed_from_u64(seed);
        let embeddings = Embeddings::new(config, &mut rng, device);
        let mut layers = Vec::with_capacity(config.attn_layers.len());
        for &kind in &config.attn_layers {
            let attention = AttentionBlock::new(kind, config, &mut rng, device);
            let feed_forward = FeedForward::new(config, &mut rng, device);
            layers.push(ReformerLayer { attention, feed_forward });
        }
        Ok(Self {
            embeddings,
            layers,
            layer_norm: LayerNormConfig::new(2 * d_model).with_epsilon(config.layer_norm_eps).init(device),
            lm_head: normal_linear(2 * d_model, config.vocab_size, true, config.initializer_range, &mut rng, device),
            config: config.clone(),
        })
    }

    /// Returns the module path of the first weight that contains a NaN or an infinity, if any.
    /// Loaders call it so that a damaged file is an error, not a run of NaN scores.
    pub fn first_non_finite_weight(&self) -> Option<String> {
        struct Find {
            path: Vec<String>,
            found: Option<String>,
        }
        impl burn::module::ModuleVisitor for Find {
            fn enter_module(&mut self, name: &str, _container_type: &str) {
                self.path.push(name.to_string());
            }
            fn exit_module(&mut self, _name: &str, _container_type: &str) {
                self.path.pop();
            }
            fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
                if self.found.is_none() && !param.val().is_finite().all().into_scalar::<bool>() {
                    self.found = Some(self.path.join("."));
                }
            }
        }
        let mut find = Find { path: Vec::new(), found: None };
        self.visit(&mut find);
        find.found
    }

    /// Returns the model's config.
    pub fn config(&self) -> &ReformerConfig {
        &self.config
    }

    /// Computes logits for token ids.
    ///
    /// Inputs longer than the shortest chunk whose length is not a multiple of the chunk
    /// lengths are padded on the right to one, with the padding masked out as keys, and the
    /// logits are cropped back. Unlike Hugging Face, which only pads in evaluation, this also
    /// applies in training.
    ///
    /// # Shapes
    /// - `ids`: `[batch_size, seq_len]`
    /// - `mask`: `[batch_size, seq_len]`, `true` for real tokens; `None` means all real
    /// - output: `[batch_size, seq_len, vocab_size]`
    pub fn forward(
        &self,
        ids: Tensor<2, Int>,
        mask: Option<&KeyMask>,
        ctx: &ForwardContext,
    ) -> Result<Tensor<3>, InputError> {
        Ok(linear::forward(&self.lm_head, self.hidden_states(ids, mask, ctx)?))
    }

    /// Computes the final hidden states (the output of Hugging Face's `ReformerModel`): the
    /// final LayerNorm over `concat(U, Z)`, before the LM head. Padding as in
    /// [`ReformerLm::forward`].
    ///
    /// # Shapes
    /// - `ids`: `[batch_size, seq_len]`
    /// - `mask`: `[batch_size, seq_len]`, `true` for real tokens; `None` means all real
    /// - output: `[batch_size, seq_len, 2 * d_model]`
    pub fn hidden_states(
        &self,
        ids: Tensor<2, Int>,
        mask: Option<&KeyMask>,
        ctx: &ForwardContext,
    ) -> Result<Tensor<3>, InputError> {
        let [batch_size, seq_len] = ids.dims();
        let (ids, mask) = self.prepare_input(ids, mask)?;
        let [_, padded_len] = ids.dims();

        let x = self.embeddings.forward(ids, ctx);
        let hidden = self.forward_embedded(x, mask.as_ref(), ctx)?; // [batch_size, padded_len, 2 * d_model]
        Ok(if padded_len > seq_len { hidden.slice([0..batch_size, 0..seq_len]) } else { hidden })
    }

    /// Checks token ids and their mask, and pads them on the right to the length the layers
    /// accept ([`ReformerConfig::padded_len`]), with the padding masked out.
    ///
    /// # Shapes
    /// - `ids`: `[batch_size, seq_len]`
    /// - `mask`: `[batch_size, seq_len]`
    /// - output: `[batch_size, padded_len]` and its mask
    pub(crate) fn prepare_input(
        &self,
        ids: Tensor<2, Int>,
        mask: Option<&KeyMask>,
    ) -> Result<(Tensor<2, Int>, Option<KeyMask>), InputError> {
        let [batch_size, seq_len] = ids.dims();
        self.check_input(&ids, mask)?;

        let padded_len = self.config.padded_len(seq_len);
        let extra = padded_len - seq_len;
        Ok(if extra > 0 {
            let pad = Tensor::<2, Int>::full([batch_size, extra], self.config.pad_token_id as i64, &ids.device());
            let mask = match mask {
                Some(mask) => mask.pad_right(extra),
                None => KeyMask::from_lengths(&vec![seq_len; batch_size], padded_len),
            };
            (Tensor::cat(vec![ids, pad], 1), Some(mask))
        } else {
            (ids, mask.cloned())
        })
    }

    /// Runs the layers and the final LayerNorm on embedded input whose length the attention
    /// layers accept (a multiple of the chunk lengths, or at most the shortest chunk).
    ///
    /// On an autodiff device the layers run inside the reversible node unless
    /// `ctx.reversible` is off; see [`crate::reversible`].
    ///
    /// # Shapes
    /// - `x`: `[batch_size, seq_len, d_model]`
    /// - output: `[batch_size, seq_len, 2 * d_model]`
    pub fn forward_embedded(
        &self,
        x: Tensor<3>,
        mask: Option<&KeyMask>,
        ctx: &ForwardContext,
    ) -> Result<Tensor<3>, InputError> {
        let [_, seq_len, _] = x.dims();
        check_num_hashes(ctx)?;
        let streams = if ctx.reversible && x.is_autodiff() {
            // The node cannot return an error, so the only one the layers can raise is
            // checked first.
            for (index, layer) in self.layers.iter().enumerate() {
                if let Some(lsh) = &layer.attention.lsh {
                    lsh.check_rotations(seq_len, index, ctx)?;
                }
            }
            reversible_layers(&self.layers, x, mask, ctx)
        } else {
            run_layers(&self.layers, x, mask, ctx)?
        };
        let hidden = norm::forward(&self.layer_norm, self.config.layer_norm_eps, streams);
        Ok(ctx.dropout(hidden, self.config.hidden_dropout_prob, FINAL_NORM_STREAM, RandomSite::FinalNorm))
    }

    fn check_input(&self, ids: &Tensor<2, Int>, mask: Option<&KeyMask>) -> Result<(), InputError> {
        let [batch_size, seq_len] = ids.dims();
        if batch_size == 0 || seq_len == 0 {
            return Err(InputError::Empty { batch_size, seq_len });
        }
        let max_len = self.config.max_seq_len();
        if seq_len > max_len {
            return Err(InputError::TooLong { seq_len, max_len });
        }
        if let Some(mask) = mask {
            let [mask_batch, mask_len] = mask.dims();
            if [mask_batch, mask_len] != [batch_size, seq_len] {
                return Err(InputError::MaskShape { mask_batch, mask_len, batch_size, seq_len });
            }
        }
        let ids_host: Vec<i64> = ids.clone().try_into_vec_as::<i64>().expect("integer ids");
        check_token_ids(&ids_host, self.config.vocab_size)
    }
}

/// Checks a `num_hashes` override of `ctx` against 1..=[`crate::config::MAX_HASHES`].
pub(crate) fn check_num_hashes(ctx: &ForwardContext) -> Result<(), InputError> {
    match ctx.num_hashes {
        Some(n) if !(1..=crate::config::MAX_HASHES).contains(&n) => Err(InputError::NumHashes(n)),
        _ => Ok(()),
    }
}

/// Checks that every token id is in `0..vocab_size`.
pub(crate) fn check_token_ids(ids: &[i64], vocab_size: usize) -> Result<(), InputError> {
    match ids.iter().find(|&&id| id < 0 || id as usize >= vocab_size) {
        Some(&id) => Err(InputError::TokenOutOfRange { id, vocab_size }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::TensorData;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::testing::{assert_causal_prefix, assert_close, max_abs_diff, random_tensor, test_device, values};

    const D_MODEL: usize = 32;
    const VOCAB_SIZE: usize = 16;

    /// Returns a valid small config: 2 heads of 16, one chunk of look-back in both attention
    /// kinds, and a maximum length of `axial_pos_shape[0] * axial_pos_shape[1]`.
    fn small_config(
        attn_layers: Vec<AttentionKind>,
        chunk_len: usize,
        axial_pos_shape: [usize; 2],
        is_decoder: bool,
    ) -> ReformerConfig {
        let config = ReformerConfig {
            attn_layers,
            hidden_size: D_MODEL,
            num_attention_heads: 2,
            attention_head_size: 16,
            num_hashes: 2,
            num_buckets: None,
            lsh_attn_chunk_length: chunk_len,
            local_attn_chunk_length: chunk_len,
            lsh_num_chunks_before: 1,
            lsh_num_chunks_after: 0,
            local_num_chunks_before: 1,
            local_num_chunks_after: 0,
            axial_pos_shape: axial_pos_shape.to_vec(),
            axial_pos_embds_dim: vec![16, 16],
            max_position_embeddings: axial_pos_shape[0] * axial_pos_shape[1],
            feed_forward_size: 64,
            is_decoder,
            vocab_size: VOCAB_SIZE,
            initializer_range: 0.2,
            ..ReformerConfig::default()
        };
        config.validate().expect("the test config is valid");
        config
    }

    /// Returns token ids drawn uniformly from the vocabulary by a host generator.
    fn random_ids(batch_size: usize, seq_len: usize, seed: u64) -> Vec<i64> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..batch_size * seq_len)
            .map(|_| rng.random_range(0..VOCAB_SIZE as i64))
            .collect()
    }

    fn ids_tensor(ids: Vec<i64>, batch_size: usize, device: &Device) -> Tensor<2, Int> {
        let seq_len = ids.len() / batch_size;
        Tensor::from_data(TensorData::new(ids, [batch_size, seq_len]), device)
    }

    #[test]
    fn reversible_inverse_reconstructs_inputs() {
        let device = test_device();
        let config = small_config(vec![AttentionKind::Local, AttentionKind::Lsh], 16, [8, 8], false);
        let model = ReformerLm::new(&config, 0, &device).unwrap();
        let ctx = ForwardContext::eval(3);
        let u = random_tensor([2, 32, D_MODEL], 1, &device);
        let z = random_tensor([2, 32, D_MODEL], 2, &device);

        for (index, layer) in model.layers.iter().enumerate() {
            let (u_out, z_out) = layer.forward(u.clone(), z.clone(), None, index, &ctx).unwrap();
            let (u_back, z_back) = layer.inverse(u_out, z_out, None, index, &ctx).unwrap();
            let u_error = max_abs_diff(&values(u_back), &values(u.clone()));
            let z_error = max_abs_diff(&values(z_back), &values(z.clone()));
            assert!(u_error < 1e-4, "layer {index}: U reconstructed with error {u_error}");
            assert!(z_error < 1e-4, "layer {index}: Z reconstructed with error {z_error}");
        }
    }

    #[test]
    fn ablated_lsh_layer_passes_residual_through() {
        let device = test_device();
        let config = small_config(vec![AttentionKind::Local, AttentionKind::Lsh], 8, [8, 8], true);
        let model = ReformerLm::new(&config, 0, &device).unwrap();
        let ablated = ForwardContext::eval(3).with_lsh_mode(LshMode::Ablated);
        let hashed = ForwardContext::eval(3);
        let u = random_tensor([2, 32, D_MODEL], 1, &device);
        let z = random_tensor([2, 32, D_MODEL], 2, &device);

        let lsh_out = values(model.layers[1].attention.forward(z.clone(), None, 1, &ablated).unwrap());
        assert!(lsh_out.iter().all(|&v| v == 0.0), "the ablated LSH block's output is not zero");
        let (u_out, _) = model.layers[1].forward(u.clone(), z.clone(), None, 1, &ablated).unwrap();
        assert_eq!(values(u_out), values(u), "U changed through an ablated LSH layer");

        // Local layers are not ablated.
        let local_ablated = values(model.layers[0].attention.forward(z.clone(), None, 0, &ablated).unwrap());
        let local_hashed = values(model.layers[0].attention.forward(z, None, 0, &hashed).unwrap());
        assert!(local_hashed.iter().any(|&v| v != 0.0), "the local block's output is zero");
        assert_eq!(local_ablated, local_hashed);
    }

    #[test]
    fn local_causal_logits_ignore_later_tokens() {
        let device = test_device();
        let config = small_config(vec![AttentionKind::Local, AttentionKind::Local], 8, [8, 8], true);
        let model = ReformerLm::new(&config, 0, &device).unwrap();
        let ctx = ForwardContext::eval(0);
        let (seq_len, last_unchanged) = (32, 13);
        let ids = random_ids(1, seq_len, 1);
        let changed: Vec<i64> = ids
            .iter()
            .enumerate()
            .map(|(t, &id)| if t > last_unchanged { (id + 1) % VOCAB_SIZE as i64 } else { id })
            .collect();

        let logits = model.forward(ids_tensor(ids, 1, &device), None, &ctx).unwrap();
        let logits_changed = model.forward(ids_tensor(changed, 1, &device), None, &ctx).unwrap();
        assert_causal_prefix(logits, logits_changed, last_unchanged, 1e-4);
    }

    #[test]
    fn lsh_causal_gradient_ignores_later_positions() {
        // Changing a later token can move earlier keys between chunks, so outputs are compared
        // through gradients: bucket ids come from host data and stay fixed during backward.
        let device = test_device().autodiff();
        let config = small_config(vec![AttentionKind::Local, AttentionKind::Lsh], 8, [8, 8], true);
        let model = ReformerLm::new(&config, 0, &device).unwrap();
        let ctx = ForwardContext::eval(4);
        let seq_len = 32;
        let ids = ids_tensor(random_ids(1, seq_len, 2), 1, &device);
        // A plain sum would not do: the final LayerNorm's outputs at one position sum to zero
        // over its features at initialisation (scale 1, shift 0), so that gradient is rounding
        // noise. Random feature weights avoid this.
        let weights = random_tensor([1, 1, 2 * D_MODEL], 3, &device);

        for position in [3, 13, 26] {
            let x = model.embeddings.forward(ids.clone(), &ctx).detach().require_grad();
            let hidden = model.forward_embedded(x.clone(), None, &ctx).unwrap(); // [1, seq_len, 2 * d_model]
            let output = hidden.slice([0..1, position..position + 1]) * weights.clone();
            let grads = output.sum().backward();
            let grad = values(x.grad(&grads).expect("the input is a tracked leaf")); // [1, seq_len, d_model]

            let row = |t: usize| &grad[t * D_MODEL..(t + 1) * D_MODEL];
            assert!(row(position).iter().any(|&g| g != 0.0), "position {position}: no gradient at the position itself");
            // Masked keys keep the weight exp(-80) of the softmax floor, so a leak below 1e-30
            // is that floor; a real one is many orders of magnitude larger.
            for later in position + 1..seq_len {
                assert!(
                    row(later).iter().all(|&g| g.abs() < 1e-30),
                    "output at {position} has a gradient from later position {later}: {:?}",
                    row(later)
                );
            }
        }
    }

    #[test]
    fn input_not_multiple_of_chunk_runs() {
        let device = test_device();
        let config = small_config(vec![AttentionKind::Local, AttentionKind::Lsh], 32, [8, 16], false);
        let model = ReformerLm::new(&config, 0, &device).unwrap();
        let ids = ids_tensor(random_ids(2, 70, 3), 2, &device);

        let logits = model.forward(ids, None, &ForwardContext::eval(0)).unwrap();
        assert_eq!(logits.dims(), [2, 70, VOCAB_SIZE]);
        assert!(values(logits).iter().all(|v| v.is_finite()), "logits contain NaN or infinity");
    }

    #[test]
    fn too_long_input_is_rejected() {
        let device = test_device();
        let config = small_config(vec![AttentionKind::Local, AttentionKind::Lsh], 8, [8, 8], true);
        let model = ReformerLm::new(&config, 0, &device).unwrap();
        let ids = ids_tensor(random_ids(1, 65, 4), 1, &device);

        let result = model.forward(ids, None, &ForwardContext::eval(0));
        assert_eq!(result.err(), Some(InputError::TooLong { seq_len: 65, max_len: 64 }));
    }

    #[test]
    fn mask_does_not_leak_into_next_call() {
        let device = test_device();
        let config = small_config(vec![AttentionKind::Local, AttentionKind::Lsh], 8, [8, 8], false);
        let model = ReformerLm::new(&config, 0, &device).unwrap();
        let fresh = model.clone();
        let ctx = ForwardContext::eval(5);
        let ids = ids_tensor(random_ids(2, 32, 5), 2, &device);

        // The reference runs before any masked call, so that state left by that call, in the
        // model or anywhere else, cannot reach it.
        let expected = fresh.forward(ids.clone(), None, &ctx).unwrap();
        // Padding in the mask adds a pad bucket, which changes the bucket layout of that call.
        let mask = KeyMask::from_lengths(&[20, 32], 32);
        model.forward(ids.clone(), Some(&mask), &ctx).unwrap();
        let unmasked = model.forward(ids, None, &ctx).unwrap();
        assert_close(&values(unmasked), &values(expected), 1e-6);
    }

    #[test]
    fn shapes_and_masks_change_between_calls() {
        let device = test_device();
        let config = small_config(vec![AttentionKind::Local, AttentionKind::Lsh], 8, [8, 8], true);
        let model = ReformerLm::new(&config, 0, &device).unwrap();
        let ctx = ForwardContext::eval(2);
        let calls: [(usize, usize, Option<Vec<usize>>); 5] =
            [(2, 5, None), (3, 17, Some(vec![17, 9, 1])), (1, 1, None), (2, 64, Some(vec![64, 30])), (3, 17, None)];
        for (batch, seq_len, lengths) in calls {
            let ids = ids_tensor(random_ids(batch, seq_len, seq_len as u64), batch, &device);
            let mask = lengths.map(|lengths| KeyMask::from_lengths(&lengths, seq_len));
            let logits = model.forward(ids.clone(), mask.as_ref(), &ctx).unwrap();
            assert_eq!(logits.dims(), [batch, seq_len, VOCAB_SIZE]);
            // A model that never ran before gives the same logits: no call leaves state behind.
            let fresh = ReformerLm::new(&config, 0, &device).unwrap();
            let expected = fresh.forward(ids, mask.as_ref(), &ctx).unwrap();
            assert_close(&values(logits), &values(expected), 1e-6);
        }
    }

    #[test]
    fn first_token_logits_do_not_depend_on_length() {
        // In a causal model the first token sees only itself, whatever follows it, so a
        // one-token input must give the first logits of any longer input. One hash round:
        // with several, rounds that see only the query itself are combined with weights that
        // add up to 1 only within about 1e-3 in f32, as in Hugging Face (spec section 7).
        let device = test_device();
        let config = ReformerConfig {
            num_hashes: 1,
            ..small_config(vec![AttentionKind::Local, AttentionKind::Lsh], 8, [8, 8], true)
        };
        let model = ReformerLm::new(&config, 0, &device).unwrap();
        let ctx = ForwardContext::eval(4);
        let ids = random_ids(1, 64, 8);
        let first = |seq_len: usize| {
            let logits = model.forward(ids_tensor(ids[..seq_len].to_vec(), 1, &device), None, &ctx).unwrap();
            values(logits.slice([0..1, 0..1, 0..VOCAB_SIZE]))
        };
        let alone = first(1);
        for seq_len in [2, 7, 8, 17, 64] {
            assert_close(&first(seq_len), &alone, 1e-5);
        }
    }

    #[cfg(feature = "wgpu")]
    #[test]
    fn wgpu_forward_matches_cpu() {
        let config = small_config(vec![AttentionKind::Local, AttentionKind::Lsh, AttentionKind::Local, AttentionKind::Lsh], 8, [8, 8], true);
        let mask = KeyMask::from_lengths(&[40, 27], 40);
        let ctx = ForwardContext::eval(9);
        let run = |device: &Device| {
            // The same seed gives the same weights on every backend.
            let model = ReformerLm::new(&config, 3, device).unwrap();
            let ids = ids_tensor(random_ids(2, 40, 9), 2, device);
            values(model.forward(ids, Some(&mask), &ctx).unwrap())
        };
        let wgpu = crate::device::select_device("wgpu").expect("a wgpu adapter (Mesa's lavapipe is enough)");
        assert_close(&run(&wgpu), &run(&test_device()), 1e-4);
    }
}

