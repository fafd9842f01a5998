//! Tokenizers of Reformer checkpoints: bytes with id = byte + 2 (google/reformer-enwik8's
//! convention) or a SentencePiece model (google/reformer-crime-and-punishment ships
//! `spiece.model`), read by the pure-Rust `sentencepiece-rs` crate.

use std::path::{Path, PathBuf};

use sentencepiece_rs::SentencePieceProcessor;

use crate::data::{bytes_to_ids, ids_to_bytes};

/// Name of the SentencePiece model file in a checkpoint folder.
pub const SENTENCEPIECE_FILE: &str = "spiece.model";

/// Errors loading or applying a tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The SentencePiece model could not be read or parsed.
    #[error("failed to load SentencePiece model {path}: {message}")]
    Load {
        /// The model file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// Text could not be encoded, or ids decoded.
    #[error("SentencePiece failed on {input}: {message}")]
    Apply {
        /// The input that failed, shortened.
        input: String,
        /// The library's message.
        message: String,
    },
    /// The tokenizer's vocabulary does not fit the model's.
    #[error("the SentencePiece model {path} has {pieces} pieces but the model's vocab_size is {vocab_size}; use the spiece.model of this checkpoint")]
    VocabMismatch {
        /// The model file.
        path: PathBuf,
        /// Pieces in the SentencePiece model.
        pieces: usize,
        /// The model's vocabulary size.
        vocab_size: usize,
    },
}

/// Maps text to token ids and back.
pub enum Tokenizer {
    /// One token per byte, id = byte + 2 (0 is padding, 1 unused; vocabulary 258).
    Bytes,
    /// A SentencePiece model.
    SentencePiece(Box<SentencePieceProcessor>),
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Bytes => write!(f, "Tokenizer::Bytes"),
            Self::SentencePiece(_) => write!(f, "Tokenizer::SentencePiece"),
        }
    }
}

impl Tokenizer {
    /// Returns the tokenizer of a checkpoint folder: its `spiece.model` when present, else
    /// bytes. `vocab_size` is the model's; a SentencePiece model with more pieces is an error.
    pub fn for_checkpoint(dir: &Path, vocab_size: usize) -> Result<Self, TokenizerError> {
        let path = dir.join(SENTENCEPIECE_FILE);
        if !path.is_file() {
            return Ok(Self::Bytes);
        }
        let processor = SentencePieceProcessor::open(&path)
            .map_err(|error| TokenizerError::Load { path: path.clone(), message: error.to_string() })?;
        let pieces = processor.model().vocab_size();
        if pieces > vocab_size {
            return Err(TokenizerError::VocabMismatch { path, pieces, vocab_size });
        }
        Ok(Self::SentencePiece(Box::new(processor)))
    }

    /// Encodes text to ids.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>, TokenizerError> {
        match self {
            Self::Bytes => Ok(bytes_to_ids(text.as_bytes())),
            Self::SentencePiece(processor) => processor
                .encode_to_ids(text)
                .map(|ids| ids.into_iter().map(|id| id as i64).collect())
                .map_err(|error| TokenizerError::Apply { input: shorten(text), message: error.to_string() }),
        }
    }

    /// Encodes raw file contents: bytes as they are, or UTF-8 text (lossily) for SentencePiece.
    pub fn encode_bytes(&self, bytes: &[u8]) -> Result<Vec<i64>, TokenizerError> {
        match self {
            Self::Bytes => Ok(bytes_to_ids(bytes)),
            Self::SentencePiece(_) => self.encode(&String::from_utf8_lossy(bytes)),
        }
    }

    /// Decodes ids to bytes (UTF-8 text for SentencePiece).
    pub fn decode(&self, ids: &[i64]) -> Result<Vec<u8>, TokenizerError> {
        match self {
            Self::Bytes => Ok(ids_to_bytes(ids)),
            Self::SentencePiece(processor) => {
                let ids: Vec<usize> = ids.iter().map(|&id| id.max(0) as usize).collect();
                processor
                    .decode_ids(&ids)
                    .map(String::into_bytes)
                    .map_err(|error| TokenizerError::Apply { input: format!("ids {ids:?}"), message: error.to_string() })
            }
        }
    }
}

fn shorten(text: &str) -> String {
    let short: String = text.chars().take(40).collect();
    if short.len() < text.len() { format!("{short:?}...") } else { format!("{short:?}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/hf-fixtures/crime_small")
    }

    #[test]
    fn sentencepiece_matches_reference_ids() {
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixture_dir().join("meta.json")).unwrap()).unwrap();
        let text = meta["sentencepiece"]["sample_text"].as_str().unwrap();
        let expected: Vec<i64> = meta["sentencepiece"]["sample_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|id| id.as_i64().unwrap())
            .collect();

        let tokenizer = Tokenizer::for_checkpoint(&fixture_dir(), 80).unwrap();
        assert!(matches!(tokenizer, Tokenizer::SentencePiece(_)));
        let ids = tokenizer.encode(text).unwrap();
        assert_eq!(ids, expected);
        assert_eq!(String::from_utf8(tokenizer.decode(&ids).unwrap()).unwrap(), text);
    }

    #[test]
    fn folder_without_model_uses_bytes() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let tokenizer = Tokenizer::for_checkpoint(dir, 258).unwrap();
        assert_eq!(tokenizer.encode("ab").unwrap(), vec![99, 100]);
        assert_eq!(tokenizer.decode(&[99, 100]).unwrap(), b"ab");
    }

    #[test]
    fn oversized_sentencepiece_vocabulary_is_rejected() {
        let error = Tokenizer::for_checkpoint(&fixture_dir(), 16).unwrap_err();
        assert!(matches!(error, TokenizerError::VocabMismatch { pieces: 80, vocab_size: 16, .. }), "{error}");
    }
}
