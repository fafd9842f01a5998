//! Training data: the duplication task of the Reformer paper and byte-level text.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::tensor::TensorData;
use rand::Rng;

/// Offset of byte ids: id = byte + 2, with 0 the padding id and 1 unused, as in Hugging
/// Face's google/reformer-enwik8 (vocabulary 258).
pub const BYTE_ID_OFFSET: i64 = 2;
/// Vocabulary size of byte-level models.
pub const BYTE_VOCAB_SIZE: usize = 258;

/// One batch of token ids with per-target weights.
#[derive(Clone, Debug)]
pub struct Batch {
    /// Token ids `[batch_size, seq_len]`, row-major.
    pub ids: Vec<i64>,
    /// Weight of each token as a prediction target `[batch_size, seq_len]`: 0 for tokens that
    /// are not scored (padding, the duplication task's first copy).
    pub weights: Vec<f32>,
    /// Rows.
    pub batch_size: usize,
    /// Columns.
    pub seq_len: usize,
}

impl Batch {
    /// Copies the batch to `device` as `(ids, weights)`, both `[batch_size, seq_len]`.
    pub fn to_tensors(&self, device: &Device) -> (Tensor<2, Int>, Tensor<2>) {
        let shape = [self.batch_size, self.seq_len];
        (
            Tensor::from_data(TensorData::new(self.ids.clone(), shape), device),
            Tensor::from_data(TensorData::new(self.weights.clone(), shape), device),
        )
    }
}

/// The duplication task (Kitaev et al. 2020, section 5): sequences `0 w 0 w` where `w` is
/// drawn uniformly from symbols `1..n_symbols`. Only the second copy of `w` is scored,
/// because the first copy is random and cannot be predicted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DuplicationTask {
    /// Length of `w`; the sequence length is `2 * (word_len + 1)`.
    pub word_len: usize,
    /// Vocabulary size: symbols are `1..n_symbols`, and 0 is the separator.
    pub n_symbols: usize,
}

impl DuplicationTask {
    /// Returns the task for sequences of `seq_len` tokens (even, at least 4).
    pub fn for_seq_len(seq_len: usize, n_symbols: usize) -> Self {
        Self { word_len: seq_len / 2 - 1, n_symbols }
    }

    /// Returns the sequence length `2 * (word_len + 1)`.
    pub fn seq_len(&self) -> usize {
        2 * (self.word_len + 1)
    }

    /// Draws a batch.
    pub fn sample(&self, batch_size: usize, rng: &mut impl Rng) -> Batch {
        let seq_len = self.seq_len();
        let mut ids = Vec::with_capacity(batch_size * seq_len);
        let mut weights = Vec::with_capacity(batch_size * seq_len);
        for _ in 0..batch_size {
            let word: Vec<i64> = (0..self.word_len)
                .map(|_| rng.random_range(1..self.n_symbols as i64))
                .collect();
            ids.push(0);
            ids.extend_from_slice(&word);
            ids.push(0);
            ids.extend_from_slice(&word);
            weights.extend(std::iter::repeat_n(0.0, self.word_len + 2));
            weights.extend(std::iter::repeat_n(1.0, self.word_len));
        }
        Batch { ids, weights, batch_size, seq_len }
    }
}

/// Errors reading training text.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A path could not be read.
    #[error("failed to read data path {path}")]
    Read {
        /// The path.
        path: PathBuf,
        /// Underlying I/O error.
        source: std::io::Error,
    },
    /// A directory contains no files.
    #[error("data directory {0} contains no files; point --data at a file or a folder with files")]
    EmptyDirectory(PathBuf),
    /// Too little data for one training sequence plus validation.
    #[error("the data has {bytes} bytes but needs at least {needed} (one sequence of {seq_len} for training and one for validation); add more text or lower --seq-len")]
    TooShort {
        /// Bytes found.
        bytes: usize,
        /// Bytes needed.
        needed: usize,
        /// Sequence length.
        seq_len: usize,
    },
    /// The data does not fit in memory.
    #[error(transparent)]
    TooLarge(#[from] crate::memory::MemoryError),
}

/// Lists the files under `paths`: files as given, folders walked recursively in sorted order.
pub fn collect_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, DataError> {
    let mut files = Vec::new();
    for path in paths {
        let meta = std::fs::metadata(path).map_err(|source| DataError::Read { path: path.clone(), source })?;
        if meta.is_dir() {
            let before = files.len();
            walk(path, &mut files)?;
            if files.len() == before {
                return Err(DataError::EmptyDirectory(path.clone()));
            }
        } else {
            files.push(path.clone());
        }
    }
    Ok(files)
}

fn walk(dir: &Path, files: &mut Vec<PathBuf>) -> Result<(), DataError> {
    let read_error = |source| DataError::Read { path: dir.to_path_buf(), source };
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(read_error)?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(read_error)?;
    entries.sort();
    for entry in entries {
        if entry.is_dir() {
            walk(&entry, files)?;
        } else {
            files.push(entry);
        }
    }
    Ok(())
}

/// Converts bytes to token ids (`byte + 2`).
pub fn bytes_to_ids(bytes: &[u8]) -> Vec<i64> {
    bytes.iter().map(|&b| b as i64 + BYTE_ID_OFFSET).collect()
}

/// Converts token ids back to bytes, skipping ids that are not bytes (padding, id 1).
pub fn ids_to_bytes(ids: &[i64]) -> Vec<u8> {
    ids.iter()
        .filter(|&&id| (BYTE_ID_OFFSET..BYTE_ID_OFFSET + 256).contains(&id))
        .map(|&id| (id - BYTE_ID_OFFSET) as u8)
        .collect()
}

/// Byte-level text split into training and validation parts: the last
/// [`ByteCorpus::VALIDATION_FRACTION`] of the concatenated bytes (at least one sequence) is held
/// out for validation.
#[derive(Clone, Debug)]
pub struct ByteCorpus {
    /// Training token ids.
    pub train: Vec<i64>,
    /// Validation token ids.
    pub validation: Vec<i64>,
}

impl ByteCorpus {
    /// Share of the bytes held out for validation.
    pub const VALIDATION_FRACTION: f64 = 0.05;

    /// Reads the files under `paths` (concatenated in order) and splits them.
    pub fn load(paths: &[PathBuf], seq_len: usize) -> Result<Self, DataError> {
        let files = collect_files(paths)?;
        let mut total = 0u64;
        for file in &files {
            total += std::fs::metadata(file).map_err(|source| DataError::Read { path: file.clone(), source })?.len();
        }
        // The bytes and their token ids (8 bytes each) are held at once.
        crate::memory::check_fits(
            total as f64 * 9.0,
            || format!("{total} bytes of text in {} files", files.len()),
            || "train on a part of the data (fewer --data paths)".to_string(),
        )?;
        let mut bytes = Vec::with_capacity(total as usize);
        for file in files {
            let data = std::fs::read(&file).map_err(|source| DataError::Read { path: file.clone(), source })?;
            bytes.extend_from_slice(&data);
        }
        Self::from_bytes(&bytes, seq_len)
    }

    /// Splits bytes held in memory.
    pub fn from_bytes(bytes: &[u8], seq_len: usize) -> Result<Self, DataError> {
        let needed = 2 * seq_len;
        if bytes.len() < needed {
            return Err(DataError::TooShort { bytes: bytes.len(), needed, seq_len });
        }
        let held_out = ((bytes.len() as f64 * Self::VALIDATION_FRACTION) as usize).max(seq_len);
        let split = bytes.len() - held_out;
        Ok(Self { train: bytes_to_ids(&bytes[..split]), validation: bytes_to_ids(&bytes[split..]) })
    }

    /// Draws a batch of random training windows of `seq_len` tokens, every token scored.
    pub fn sample(&self, batch_size: usize, seq_len: usize, rng: &mut impl Rng) -> Batch {
        let mut ids = Vec::with_capacity(batch_size * seq_len);
        for _ in 0..batch_size {
            let start = rng.random_range(0..=self.train.len() - seq_len);
            ids.extend_from_slice(&self.train[start..start + seq_len]);
        }
        Batch { weights: vec![1.0; ids.len()], ids, batch_size, seq_len }
    }

    /// Returns up to `max_windows` consecutive non-overlapping validation windows.
    pub fn validation_windows(&self, seq_len: usize, max_windows: usize) -> Vec<Vec<i64>> {
        self.validation
            .chunks_exact(seq_len)
            .take(max_windows)
            .map(<[i64]>::to_vec)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn duplication_batch_repeats_word() {
        let task = DuplicationTask { word_len: 5, n_symbols: 8 };
        let batch = task.sample(2, &mut StdRng::seed_from_u64(1));
        assert_eq!(batch.seq_len, 12);
        let row = &batch.ids[..12];
        assert_eq!(row[0], 0);
        assert_eq!(row[6], 0);
        assert_eq!(row[1..6], row[7..12]);
        assert!(row[1..6].iter().all(|&s| (1..8).contains(&s)));
        assert_eq!(batch.weights[..12].iter().filter(|&&w| w > 0.0).count(), 5);
        assert_eq!(batch.weights[7], 1.0);
        assert_eq!(batch.weights[6], 0.0);
    }

    #[test]
    fn byte_ids_round_trip() {
        let bytes = b"\x00ab\xff";
        assert_eq!(ids_to_bytes(&bytes_to_ids(bytes)), bytes.to_vec());
        assert_eq!(bytes_to_ids(b"\x00")[0], 2);
    }

    #[test]
    fn corpus_holds_out_the_tail() {
        let bytes: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        let corpus = ByteCorpus::from_bytes(&bytes, 16).unwrap();
        assert_eq!(corpus.validation.len(), 50);
        assert_eq!(corpus.train.len(), 950);
        assert_eq!(corpus.validation[0], bytes_to_ids(&bytes[950..951])[0]);
    }

    #[test]
    fn short_corpus_is_an_error() {
        assert!(matches!(ByteCorpus::from_bytes(b"abc", 16), Err(DataError::TooShort { .. })));
    }

    #[test]
    fn unusable_paths_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.txt");
        let error = ByteCorpus::load(std::slice::from_ref(&missing), 8).unwrap_err();
        assert!(matches!(&error, DataError::Read { path, .. } if path == &missing), "{error}");

        let empty_dir = dir.path().join("empty");
        std::fs::create_dir(&empty_dir).unwrap();
        let error = ByteCorpus::load(std::slice::from_ref(&empty_dir), 8).unwrap_err();
        assert!(matches!(&error, DataError::EmptyDirectory(path) if path == &empty_dir), "{error}");

        let empty_file = dir.path().join("empty.txt");
        std::fs::write(&empty_file, b"").unwrap();
        let error = ByteCorpus::load(&[empty_file], 8).unwrap_err();
        assert!(matches!(error, DataError::TooShort { bytes: 0, needed: 16, seq_len: 8 }), "{error}");
    }

    #[test]
    fn binary_data_is_valid_input() {
        let dir = tempfile::tempdir().unwrap();
        let bytes: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
        std::fs::write(dir.path().join("data.bin"), &bytes).unwrap();
        let corpus = ByteCorpus::load(&[dir.path().to_path_buf()], 64).unwrap();
        let all: Vec<i64> = corpus.train.iter().chain(&corpus.validation).copied().collect();
        assert_eq!(ids_to_bytes(&all), bytes);
    }
}
