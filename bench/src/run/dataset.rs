//! bench_serving's "random" dataset without a tokenizer: prompts of N words from a small
//! vocabulary (about one token each for common BPE tokenizers).

use rand::rngs::StdRng;
use rand::Rng;

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

/// Lengths drawn uniformly from `[len * ratio, len]` like bench_serving (input at least 1,
/// output at least 1 so that every request streams something).
pub fn sample_random(
    rng: &mut StdRng,
    num: usize,
    input_len: usize,
    output_len: usize,
    range_ratio: f64,
) -> Vec<Prompt> {
    let in_lo = ((input_len as f64 * range_ratio) as usize).max(1);
    let out_lo = ((output_len as f64 * range_ratio) as usize).max(1);
    (0..num)
        .map(|_| {
            let input_len = rng.random_range(in_lo..=input_len.max(in_lo));
            let output_len = rng.random_range(out_lo..=output_len.max(out_lo));
            let mut text = String::with_capacity(input_len * 7);
            for i in 0..input_len {
                if i > 0 {
                    text.push(' ');
                }
                text.push_str(WORDS[rng.random_range(0..WORDS.len())]);
            }
            Prompt {
                text,
                input_len,
                output_len,
            }
        })
        .collect()
}
