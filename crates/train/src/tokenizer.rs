//! Byte-level BPE tokenizers (the `tokenizers` crate) and `data prepare`: train or load a
//! tokenizer, encode text files, and write train/validation token files.

use crate::error::{io, TrainError};
use crate::tokens::write_tokens;
use std::path::{Path, PathBuf};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer, TokenizerBuilder};

fn tok_err(path: &Path, reason: impl std::fmt::Display) -> TrainError {
    TrainError::Tokenizer {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// Loads a `tokenizer.json`.
pub fn load(path: &Path) -> Result<Tokenizer, TrainError> {
    if !path.exists() {
        return Err(tok_err(path, "no such file"));
    }
    Tokenizer::from_file(path).map_err(|e| tok_err(path, format!("cannot load: {e}")))
}

/// Errors unless the tokenizer at `path` has exactly `vocab` tokens (its ids must be the
/// model's).
pub fn check_vocab(path: &Path, vocab: usize) -> Result<(), TrainError> {
    let t = load(path)?;
    let n = t.get_vocab_size(true);
    if n != vocab {
        return Err(tok_err(
            path,
            format!("has {n} tokens, but the model/data vocabulary is {vocab}; use the tokenizer the token files were made with"),
        ));
    }
    Ok(())
}

/// Trains a byte-level BPE tokenizer (GPT-2's scheme: every byte is a base token, so any text
/// encodes) with `vocab` tokens on `files`, with `<|endoftext|>` as its one special token.
pub fn train_bpe(files: &[PathBuf], vocab: usize) -> Result<Tokenizer, TrainError> {
    let first = files.first().cloned().unwrap_or_default();
    if vocab < 257 {
        return Err(tok_err(
            &first,
            format!("--vocab {vocab} is below 257 (256 bytes + <|endoftext|>)"),
        ));
    }
    for f in files {
        std::fs::metadata(f).map_err(io(f))?;
    }
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(vocab)
        .min_frequency(2)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .special_tokens(vec![AddedToken::from("<|endoftext|>", true)])
        .build();
    let mut tokenizer = TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_normalizer(None::<tokenizers::NormalizerWrapper>)
        .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
        .with_post_processor(Some(ByteLevel::new(false, true, true)))
        .with_decoder(Some(ByteLevel::new(false, true, true)))
        .build()
        .map_err(|e| tok_err(&first, e))?;
    let names: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
    tokenizer
        .train_from_files(&mut trainer, names)
        .map_err(|e| tok_err(&first, format!("training failed: {e}")))?;
    Ok(Tokenizer::from(tokenizer))
}

/// What `prepare` wrote.
#[derive(Clone, Debug)]
pub struct Prepared {
    /// Vocabulary size of the tokenizer (and of the token files).
    pub vocab_size: usize,
    /// Training tokens written.
    pub train_tokens: usize,
    /// Validation tokens written.
    pub val_tokens: usize,
    /// `out/tokenizer.json`.
    pub tokenizer: PathBuf,
    /// `out/train.tok`.
    pub train_file: PathBuf,
    /// `out/val.tok`.
    pub val_file: PathBuf,
}

/// Tokenizes `files` (documents separated by `<|endoftext|>`) with `tokenizer` (trained with
/// `vocab` tokens when `None`), and writes `tokenizer.json`, `train.tok` and `val.tok` into
/// `out`; the last `val_fraction` of the token stream is validation.
pub fn prepare(
    files: &[PathBuf],
    tokenizer: Option<&Path>,
    vocab: usize,
    val_fraction: f64,
    out: &Path,
) -> Result<Prepared, TrainError> {
    if files.is_empty() {
        return Err(TrainError::Data("no text files given".into()));
    }
    if !(val_fraction > 0.0 && val_fraction < 1.0) {
        return Err(TrainError::Data(format!(
            "--val-fraction {val_fraction} is not in (0, 1)"
        )));
    }
    crate::fsutil::ensure_writable_dir(out)?;
    let tok = match tokenizer {
        Some(p) => load(p)?,
        None => train_bpe(files, vocab)?,
    };
    let vocab_size = tok.get_vocab_size(true);
    let eot = tok.token_to_id("<|endoftext|>");
    let mut ids: Vec<u32> = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(f).map_err(io(f))?;
        let enc = tok
            .encode(text.as_str(), false)
            .map_err(|e| tok_err(f, format!("encoding failed: {e}")))?;
        ids.extend_from_slice(enc.get_ids());
        if let Some(e) = eot {
            ids.push(e);
        }
    }
    let n_val = ((ids.len() as f64 * val_fraction).round() as usize).max(2);
    if ids.len() < n_val + 2 {
        return Err(TrainError::Data(format!(
            "the text gives only {} tokens, too few to split into train and validation",
            ids.len()
        )));
    }
    let split = ids.len() - n_val;
    let tokenizer_path = out.join("tokenizer.json");
    let json = tok
        .to_string(true)
        .map_err(|e| tok_err(&tokenizer_path, e))?;
    crate::fsutil::write_atomic(&tokenizer_path, json.as_bytes())?;
    let (train_file, val_file) = (out.join("train.tok"), out.join("val.tok"));
    write_tokens(&train_file, &ids[..split], vocab_size as u32)?;
    write_tokens(&val_file, &ids[split..], vocab_size as u32)?;
    Ok(Prepared {
        vocab_size,
        train_tokens: split,
        val_tokens: n_val,
        tokenizer: tokenizer_path,
        train_file,
        val_file,
    })
}
