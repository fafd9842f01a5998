//! Token and position embeddings.

use burn::module::{Module, Param};
use burn::prelude::*;
use burn::tensor::TensorData;
use rand::rngs::StdRng;

use crate::config::ReformerConfig;
use crate::context::{ForwardContext, RandomSite, bernoulli_keep_mask};
use crate::init::normal_param;

/// Axial position embeddings (Kitaev et al. 2020, section on axial positional encodings):
/// position `p` is `concat(rows[p / A1], cols[p % A1])`, two small tables instead of one
/// `[max_len, d_model]` table.
#[derive(Module, Debug)]
pub struct AxialPositionEmbeddings {
    /// Row table `[A0, 1, d0]` (Hugging Face's `weights.0`): the first `d0` features.
    pub rows: Param<Tensor<3>>,
    /// Column table `[1, A1, d1]` (Hugging Face's `weights.1`): the last `d1` features.
    pub cols: Param<Tensor<3>>,
}

impl AxialPositionEmbeddings {
    /// Returns the position embeddings of positions `0..seq_len`.
    ///
    /// # Shapes
    /// - output: `[seq_len, d_model]`
    pub fn forward(&self, seq_len: usize) -> Tensor<2> {
        let [a0, _, d0] = self.rows.dims();
        let [_, a1, d1] = self.cols.dims();
        let rows = self.rows.val().expand([a0, a1, d0]);
        let cols = self.cols.val().expand([a0, a1, d1]);
        Tensor::cat(vec![rows, cols], 2) // [A0, A1, d_model]
            .reshape([a0 * a1, d0 + d1])
            .slice([0..seq_len])
    }
}

/// Position embeddings: axial or one learned table.
#[derive(Module, Debug)]
pub struct PositionEmbeddings {
    /// Axial tables, when `axial_pos_embds` is set.
    pub axial: Option<AxialPositionEmbeddings>,
    /// Learned table `[max_position_embeddings, d_model]` otherwise.
    pub table: Option<Param<Tensor<2>>>,
    /// Column count `A1` of the axial shape (0 without axial embeddings).
    pub axial_cols: usize,
}

/// Word embedding plus position embedding, with Hugging Face's dropout placement.
#[derive(Module, Debug)]
pub struct Embeddings {
    /// Token table `[vocab_size, d_model]`.
    pub word: Param<Tensor<2>>,
    /// Position embeddings.
    pub position: PositionEmbeddings,
    /// Dropout probability `hidden_dropout_prob`.
    pub dropout: f64,
}

impl Embeddings {
    /// Creates the embeddings from the model config.
    pub fn new(config: &ReformerConfig, rng: &mut StdRng, device: &Device) -> Self {
        let d_model = config.hidden_size;
        let position = if config.axial_pos_embds {
            let [a0, a1] = [config.axial_pos_shape[0], config.axial_pos_shape[1]];
            let [d0, d1] = [config.axial_pos_embds_dim[0], config.axial_pos_embds_dim[1]];
            PositionEmbeddings {
                axial: Some(AxialPositionEmbeddings {
                    rows: normal_param([a0, 1, d0], config.axial_norm_std, rng, device),
                    cols: normal_param([1, a1, d1], config.axial_norm_std, rng, device),
                }),
                table: None,
                axial_cols: a1,
            }
        } else {
            PositionEmbeddings {
                axial: None,
                table: Some(normal_param([config.max_position_embeddings, d_model], config.initializer_range, rng, device)),
                axial_cols: 0,
            }
        };
        Self {
            word: normal_param([config.vocab_size, d_model], config.initializer_range, rng, device),
            position,
            dropout: config.hidden_dropout_prob,
        }
    }

    /// Embeds token ids.
    ///
    /// # Shapes
    /// - `ids`: `[batch_size, seq_len]`
    /// - output: `[batch_size, seq_len, d_model]`
    pub fn forward(&self, ids: Tensor<2, Int>, ctx: &ForwardContext) -> Tensor<3> {
        let [batch_size, seq_len] = ids.dims();
        let d_model = self.word.dims()[1];
        let words = self
            .word
            .val()
            .select(0, ids.reshape([batch_size * seq_len]))
            .reshape([batch_size, seq_len, d_model]);
        let words = ctx.dropout(words, self.dropout, 0, RandomSite::EmbeddingDropout);

        let positions = match (&self.position.axial, &self.position.table) {
            (Some(axial), _) => axial.forward(seq_len),
            (None, Some(table)) => table.val().slice([0..seq_len]),
            (None, None) => unreachable!("position embeddings have either an axial or a learned table"),
        }
        .unsqueeze_dim::<3>(0); // [1, seq_len, d_model]
        let positions = self.position_dropout(positions, batch_size, ctx);
        words + positions
    }

    /// Embeds one token per row at the given positions, without dropout: the input of one
    /// decoding step.
    ///
    /// # Shapes
    /// - `ids`: `[batch_size, 1]`
    /// - `positions`: `batch_size` positions, each below the model's maximum length
    /// - output: `[batch_size, 1, d_model]`
    pub fn forward_at(&self, ids: Tensor<2, Int>, positions: &[usize]) -> Tensor<3> {
        let [batch_size, _] = ids.dims();
        let d_model = self.word.dims()[1];
        let device = ids.device();
        let index = |values: Vec<i64>| Tensor::<1, Int>::from_data(TensorData::new(values, [batch_size]), &device);
        let words = self.word.val().select(0, ids.reshape([batch_size])); // [batch_size, d_model]
        let positions = match (&self.position.axial, &self.position.table) {
            (Some(axial), _) => {
                let [a0, _, d0] = axial.rows.dims();
                let [_, a1, d1] = axial.cols.dims();
                let rows = index(positions.iter().map(|&p| (p / a1) as i64).collect());
                let cols = index(positions.iter().map(|&p| (p % a1) as i64).collect());
                Tensor::cat(
                    vec![
                        axial.rows.val().reshape([a0, d0]).select(0, rows),
                        axial.cols.val().reshape([a1, d1]).select(0, cols),
                    ],
                    1,
                )
            }
            (None, Some(table)) => table.val().select(0, index(positions.iter().map(|&p| p as i64).collect())),
            (None, None) => unreachable!("position embeddings have either an axial or a learned table"),
        };
        (words + positions).reshape([batch_size, 1, d_model])
    }

    /// Applies position dropout. For axial embeddings it follows Hugging Face's `dropout2d`
    /// over a `[batch, A1, A0, d_model]` view: one draw per (batch row, column index `p % A1`)
    /// zeroes all features of every position in that column.
    fn position_dropout(&self, positions: Tensor<3>, batch_size: usize, ctx: &ForwardContext) -> Tensor<3> {
        if !ctx.training || self.dropout <= 0.0 {
            return positions;
        }
        let [_, seq_len, _] = positions.dims();
        if self.position.axial.is_none() {
            let positions = positions.repeat_dim(0, batch_size);
            return ctx.dropout(positions, self.dropout, 0, RandomSite::PositionDropout);
        }
        let cols = self.position.axial_cols;
        let seed = ctx.stream_seed(0, RandomSite::PositionDropout);
        let draws = bernoulli_keep_mask(batch_size * cols, self.dropout, seed);
        let factors: Vec<f32> = (0..batch_size)
            .flat_map(|b| (0..seq_len).map(move |p| (b, p)))
            .map(|(b, p)| draws[b * cols + p % cols])
            .collect();
        let factors = Tensor::<3>::from_data(
            burn::tensor::TensorData::new(factors, [batch_size, seq_len, 1]),
            &positions.device(),
        );
        positions * factors
    }
}
