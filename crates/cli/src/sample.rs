//! `scaletrain sample`: generate text from a checkpoint.

use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use train::sample::{SampleOptions, Sampler};

/// Arguments of `scaletrain sample`.
#[derive(clap::Args, Debug, Clone)]
pub struct SampleArgs {
    /// A run folder (its newest checkpoint) or a checkpoint manifest (step-*.json).
    #[arg(long, default_value = "runs/default")]
    pub checkpoint: PathBuf,
    /// Prompt text (encoded with the run's tokenizer; for the synthetic corpus, one character
    /// per token from its alphabet).
    #[arg(long)]
    pub prompt: Option<String>,
    /// Prompt as token ids separated by spaces or commas.
    #[arg(long)]
    pub prompt_tokens: Option<String>,
    /// Tokens to generate.
    #[arg(long, default_value_t = 200)]
    pub tokens: usize,
    /// Softmax temperature (0 = greedy).
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
    /// Sample among the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Sampler seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Kernel threads.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
}

/// Runs `scaletrain sample`.
pub fn run(a: &SampleArgs) -> Result<()> {
    let mut s = Sampler::load(&a.checkpoint).context("cannot sample")?;
    let dir = s
        .manifest_path
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default();
    let synthetic = s.manifest.config.data.source == train::config::DataSource::Synthetic;
    let tok_path = [dir.join("tokenizer.json")]
        .into_iter()
        .chain(s.manifest.config.data.tokenizer.clone())
        .find(|p| p.exists());
    let tokenizer = match (&tok_path, synthetic) {
        (Some(p), false) => {
            let t = train::tokenizer::load(p)?;
            train::tokenizer::check_vocab(p, s.layout.cfg.vocab_size)?;
            Some(t)
        }
        _ => None,
    };
    let prompt: Vec<u32> = match (&a.prompt_tokens, &a.prompt) {
        (Some(ids), _) => ids
            .split([' ', ','])
            .filter(|x| !x.is_empty())
            .map(|x| x.parse::<u32>().with_context(|| format!("--prompt-tokens: '{x}' is not a token id")))
            .collect::<Result<_>>()?,
        (None, Some(text)) if synthetic => text
            .bytes()
            .map(|ch| {
                train::synthetic::ALPHABET
                    .iter()
                    .position(|&c| c == ch)
                    .map(|i| i as u32)
                    .with_context(|| format!("--prompt: '{}' is not a symbol of the synthetic corpus", ch as char))
            })
            .collect::<Result<_>>()?,
        (None, Some(text)) => match &tokenizer {
            Some(t) => t
                .encode(text.as_str(), false)
                .map_err(|e| anyhow::anyhow!("encoding the prompt: {e}"))?
                .get_ids()
                .to_vec(),
            None => bail!("--prompt needs the run's tokenizer.json (not found next to the checkpoint); use --prompt-tokens"),
        },
        (None, None) => vec![0],
    };
    let opts = SampleOptions {
        tokens: a.tokens,
        temperature: a.temperature,
        top_k: a.top_k,
        seed: a.seed,
        threads: a.threads,
    };
    let out = s.generate(&prompt, &opts)?;
    let render = |ids: &[u32]| -> Result<String> {
        if synthetic {
            return Ok(train::synthetic::render(ids));
        }
        match &tokenizer {
            Some(t) => t
                .decode(ids, false)
                .map_err(|e| anyhow::anyhow!("decoding: {e}")),
            None => Ok(ids
                .iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(" ")),
        }
    };
    eprintln!(
        "checkpoint {} (step {}), temperature {}, top-k {}",
        s.manifest_path.display(),
        s.manifest.step,
        a.temperature,
        a.top_k
    );
    // Decode prompt and continuation together: BPE pieces may only form text jointly.
    let all: Vec<u32> = prompt.iter().chain(&out).copied().collect();
    println!("{}", render(&all)?);
    Ok(())
}
