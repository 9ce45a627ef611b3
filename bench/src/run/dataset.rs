//! bench_serving's "random" and "random-ids" datasets: lengths drawn from numpy's stream as
//! bench_serving draws them; "random" prompts are N words from a small vocabulary (about one
//! token each for common BPE tokenizers), "random-ids" prompts are token ids decoded with the
//! `--tokenizer`, exactly as bench_serving makes them.

use anyhow::Context;
use rand::rngs::StdRng;
use rand::Rng;

use super::config::Dataset;
use super::numpy_random::RandomState;
use super::tokenizer::Tokenizer;

#[derive(Debug, Clone)]
pub struct Prompt {
    pub text: String,
    /// Nominal input length in tokens (what bench_serving reports as `prompt_len`).
    pub input_len: usize,
    pub output_len: usize,
}

const WORDS: &[&str] = &[
    "the", "model", "token", "stream", "region", "gateway", "latency", "cluster", "mesh", "east",
    "west", "packet", "river", "mountain", "city", "train", "cloud", "signal", "light", "number",
    "answer", "question", "story", "paper", "window", "table", "green", "blue", "quick", "slow",
    "north", "south",
];

/// bench_serving's `compute_random_lens`: `n` lengths uniform in `[max(len * ratio, 1), len]`
/// from numpy's stream (all zero, without a draw, for `len == 0`).
fn random_lens(
    np: &mut RandomState,
    full_len: usize,
    range_ratio: f64,
    n: usize,
) -> anyhow::Result<Vec<usize>> {
    if full_len == 0 {
        return Ok(vec![0; n]);
    }
    let low = ((full_len as f64 * range_ratio) as i64).max(1);
    let high = i64::try_from(full_len).context("length too large")? + 1;
    (0..n)
        .map(|_| Ok(np.randint(low, high)? as usize))
        .collect()
}

/// bench_serving's `sample_random_requests`: input lengths, then output lengths, drawn from
/// `np` as bench_serving draws them; with a tokenizer each input length is shortened by the
/// special tokens it adds (the server adds them back). `random-ids` then draws one offset
/// per prompt into the vocabulary from `np` and decodes ids `(offset + i + j) % vocab`;
/// `random` takes words from `words`, a separate generator (sglang's text is ShareGPT's).
#[allow(clippy::too_many_arguments)]
pub fn sample(
    np: &mut RandomState,
    words: &mut StdRng,
    dataset: Dataset,
    tokenizer: Option<&Tokenizer>,
    num: usize,
    input_len: usize,
    output_len: usize,
    range_ratio: f64,
) -> anyhow::Result<Vec<Prompt>> {
    let mut prompts = sample_random(np, words, num, input_len, output_len, range_ratio)?;
    if let Some(tok) = tokenizer {
        let special = tok.num_special_tokens_to_add();
        for p in &mut prompts {
            p.input_len = p.input_len.saturating_sub(special).max(1);
        }
    }
    match (dataset, tokenizer) {
        (Dataset::Random, _) => {
            if tokenizer.is_some() {
                // Same words, now as many as the shortened lengths.
                for p in &mut prompts {
                    let keep = p.text.split(' ').take(p.input_len).collect::<Vec<_>>();
                    p.text = keep.join(" ");
                }
            }
        }
        (Dataset::RandomIds, None) => {
            anyhow::bail!("--dataset-name random-ids needs --tokenizer")
        }
        (Dataset::RandomIds, Some(tok)) => {
            let vocab = tok.vocab_size();
            anyhow::ensure!(
                vocab > 0,
                "--tokenizer {}: empty vocabulary",
                tok.path.display()
            );
            let vocab_i64 = i64::try_from(vocab).context("vocabulary too large")?;
            let offsets = (0..num)
                .map(|_| np.randint(0, vocab_i64))
                .collect::<anyhow::Result<Vec<i64>>>()?;
            for (i, (p, offset)) in prompts.iter_mut().zip(offsets).enumerate() {
                let ids: Vec<u32> = (0..p.input_len)
                    .map(|j| ((offset as u64 + (i + j) as u64) % vocab as u64) as u32)
                    .collect();
                p.text = tok.decode(&ids)?;
            }
        }
    }
    Ok(prompts)
}

/// The `random` dataset's lengths and word prompts (no tokenizer).
pub fn sample_random(
    np: &mut RandomState,
    words: &mut StdRng,
    num: usize,
    input_len: usize,
    output_len: usize,
    range_ratio: f64,
) -> anyhow::Result<Vec<Prompt>> {
    let input_lens = random_lens(np, input_len, range_ratio, num)?;
    let output_lens = random_lens(np, output_len, range_ratio, num)?;
    Ok(input_lens
        .into_iter()
        .zip(output_lens)
        .map(|(input_len, output_len)| {
            let mut text = String::with_capacity(input_len * 7);
            for i in 0..input_len {
                if i > 0 {
                    text.push(' ');
                }
                text.push_str(WORDS[words.random_range(0..WORDS.len())]);
            }
            Prompt {
                text,
                input_len,
                output_len,
            }
        })
        .collect())
}
