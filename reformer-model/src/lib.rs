//! Reformer (Kitaev, Kaiser and Levskaya, "Reformer: The Efficient Transformer", ICLR 2020)
//! on Burn 0.22: LSH and local self-attention, reversible layers, chunked feed-forward, axial
//! position embeddings and an LM head, computing what Hugging Face's `ReformerModelWithLMHead`
//! and `ReformerForMaskedLM` compute (transformers 5.25).
//!
//! No module names a backend: the [`burn::prelude::Device`] passed to `new` picks it, and
//! [`device::select_device`] maps a backend name to a device among those compiled in.

pub mod attention;
pub mod checkpoint;
pub mod config;
pub mod context;
pub mod data;
pub mod decode;
pub mod device;
pub mod embeddings;
pub mod error;
pub mod feed_forward;
pub mod hf;
#[cfg(feature = "flex")]
mod host;
#[cfg(test)]
mod hf_parity;
mod init;
// The backend extension names NdArray (see `reversible` below).
#[allow(deprecated)]
pub mod linear;
pub mod loss;
pub mod memory;
pub mod model;
// The backend extension names NdArray (see `reversible` below).
#[allow(deprecated)]
pub mod norm;
// The backend extension names NdArray, deprecated upstream in favour of Flex; both stay
// selectable, and the code the extension macro generates takes no item-level `allow`.
#[allow(deprecated)]
pub mod reversible;
pub mod sampling;
pub mod tokenizer;
#[cfg(test)]
pub(crate) mod testing;

pub use config::{Activation, AttentionKind, NumBuckets, ReformerConfig};
pub use context::{ForwardContext, KeyMask, LshMode, Rotations};
pub use error::{ConfigError, InputError};
pub use model::ReformerLm;
