//! `scaletrain data prepare`: text files → tokenizer.json + train.tok + val.tok.

use anyhow::{Context, Result};
use std::path::PathBuf;

/// Arguments of `scaletrain data prepare`.
#[derive(clap::Args, Debug, Clone)]
pub struct PrepareArgs {
    /// UTF-8 text files (each one a document).
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Vocabulary size of the byte-level BPE tokenizer to train (>= 257).
    #[arg(long, default_value_t = 4096)]
    pub vocab: usize,
    /// Use this tokenizer.json instead of training one.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Share of the tokens (the end of the stream) kept for validation.
    #[arg(long, default_value_t = 0.1)]
    pub val_fraction: f64,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
}

/// Runs `scaletrain data prepare`.
pub fn prepare(a: &PrepareArgs) -> Result<()> {
    let p = train::tokenizer::prepare(
        &a.files,
        a.tokenizer.as_deref(),
        a.vocab,
        a.val_fraction,
        &a.out,
    )
    .context("data prepare failed")?;
    println!(
        "tokenizer: {} ({} tokens{})",
        p.tokenizer.display(),
        p.vocab_size,
        if a.tokenizer.is_some() {
            ", given"
        } else {
            ", trained"
        }
    );
    println!(
        "train: {} ({} tokens)",
        p.train_file.display(),
        p.train_tokens
    );
    println!(
        "validation: {} ({} tokens)",
        p.val_file.display(),
        p.val_tokens
    );
    println!("train on it with a config holding:");
    println!(
        "[data]\nsource = \"files\"\ntrain_file = {:?}\nval_file = {:?}\ntokenizer = {:?}",
        p.train_file.display().to_string(),
        p.val_file.display().to_string(),
        p.tokenizer.display().to_string()
    );
    Ok(())
}
