//! `--tokenizer`: a model's `tokenizer.json` (HF `tokenizers`), used as bench_serving uses
//! its tokenizer: to retokenize generated text, to size prompts and to decode the token ids
//! of the `random-ids` dataset.

use std::path::{Path, PathBuf};

use anyhow::Context;

#[derive(Debug)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// The tokenizer.json actually read (for messages).
    pub path: PathBuf,
}

impl Tokenizer {
    /// Reads `path`: a tokenizer.json, or a directory holding one (as a model directory does).
    pub fn load(path: &Path) -> anyhow::Result<Tokenizer> {
        let file = if path.is_dir() {
            path.join("tokenizer.json")
        } else {
            path.to_path_buf()
        };
        let inner = tokenizers::Tokenizer::from_file(&file)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("--tokenizer {}: cannot load", file.display()))?;
        Ok(Tokenizer { inner, path: file })
    }

    /// transformers' `tokenizer.vocab_size`: the base vocabulary, without added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(false)
    }

    /// transformers' `num_special_tokens_to_add()`: what the post-processor adds to one
    /// sequence (e.g. BOS).
    pub fn num_special_tokens_to_add(&self) -> usize {
        use tokenizers::PostProcessor;
        self.inner
            .get_post_processor()
            .map_or(0, |p| p.added_tokens(false))
    }

    /// Tokens in `text` without special tokens (bench_serving's
    /// `len(tokenizer.encode(text, add_special_tokens=False))`).
    pub fn count(&self, text: &str) -> anyhow::Result<usize> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("tokenizing with {}", self.path.display()))?;
        Ok(enc.len())
    }

    /// transformers' `tokenizer.decode(ids)` (special tokens kept).
    pub fn decode(&self, ids: &[u32]) -> anyhow::Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("decoding with {}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> Tokenizer {
        Tokenizer::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer"))
            .expect("the fixture tokenizer loads")
    }

    /// The figures transformers gives for the same directory (checked with
    /// `AutoTokenizer.from_pretrained`): vocab_size 189, num_special_tokens_to_add() 1.
    #[test]
    fn counts_and_decodes_as_transformers() {
        let tok = fixture();
        assert_eq!(tok.vocab_size(), 189);
        assert_eq!(tok.num_special_tokens_to_add(), 1);
        assert_eq!(tok.count("the model streams xyz").unwrap(), 4);
        assert_eq!(tok.count("").unwrap(), 0);
        assert_eq!(tok.decode(&[1, 2, 3]).unwrap(), "<s> the model");
    }

    #[test]
    fn a_missing_tokenizer_is_a_clear_error() {
        let err = Tokenizer::load(Path::new("/nonexistent/tok")).unwrap_err();
        assert!(
            format!("{err:#}").contains("--tokenizer /nonexistent/tok"),
            "{err:#}"
        );
    }
}
