//! bench_serving's "random" dataset without a tokenizer: prompts of N words from a small
//! vocabulary (about one token each for common BPE tokenizers).

use anyhow::Context;
use rand::rngs::StdRng;
use rand::Rng;

use super::numpy_random::RandomState;

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

/// The `random` dataset: input lengths, then output lengths, drawn from `np` exactly as
/// bench_serving draws them (so one seed gives both tools the same lengths); the prompt
/// words come from `words`, a separate generator, as sglang's text comes from ShareGPT.
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
