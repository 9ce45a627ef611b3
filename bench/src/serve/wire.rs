//! OpenAI-compatible request and response JSON, with sglang's field names and chunk shapes
//! (`python/sglang/srt/entrypoints/openai/protocol.py`): pydantic dumps `None` fields as
//! `null`, so the optional fields below are serialized as `null` rather than skipped.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Requests larger than this are refused (a chat prompt, not an upload).
pub const MAX_REQUEST_BYTES: usize = 16 << 20;
/// sglang refuses `max_tokens` above the context length; ours is fixed.
pub const CONTEXT_LENGTH: u64 = 131_072;

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// `POST /v1/chat/completions`. Unknown fields (temperature, tools, ...) are accepted
/// and ignored, as a model server without sampling has no use for them.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub messages: Vec<ChatMessage>,
    /// Choices to generate.
    #[serde(default = "one")]
    pub n: u32,
    #[serde(default)]
    pub max_tokens: Option<u64>,
    #[serde(default)]
    pub max_completion_tokens: Option<u64>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
}

#[derive(Debug, Deserialize)]
pub struct ChatMessage {
    #[allow(dead_code)] // validated for presence only
    pub role: String,
    /// A string or a list of content parts; only its text length matters here.
    #[serde(default)]
    pub content: Value,
}

/// `POST /v1/completions`.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub prompt: Value,
    /// Choices to generate per prompt.
    #[serde(default = "one")]
    pub n: u32,
    #[serde(default)]
    pub max_tokens: Option<u64>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
}

/// sglang's native `POST /generate` (the fields this server uses).
#[derive(Debug, Deserialize)]
pub struct GenerateRequest {
    #[serde(default)]
    pub text: Option<Value>,
    #[serde(default)]
    pub input_ids: Option<Value>,
    #[serde(default)]
    pub sampling_params: Option<SamplingParams>,
    #[serde(default)]
    pub stream: bool,
}

/// A /generate response or stream event: the text so far and sglang's `meta_info`.
#[derive(Debug, Serialize)]
pub struct NativeOutput<'a> {
    pub text: &'a str,
    pub meta_info: NativeMeta<'a>,
}

#[derive(Debug, Serialize)]
pub struct NativeMeta<'a> {
    pub id: &'a str,
    pub finish_reason: Option<NativeFinish>,
    pub prompt_tokens: u64,
    pub weight_version: &'static str,
    pub completion_tokens: usize,
    pub cached_tokens: u64,
}

/// `{"type": "length", "length": N}` or `{"type": "stop", "matched": null}`.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum NativeFinish {
    Length { length: usize },
    Stop { matched: Option<()> },
}

#[derive(Debug, Default, Deserialize)]
pub struct SamplingParams {
    #[serde(default)]
    pub max_new_tokens: Option<u64>,
}

fn one() -> u32 {
    1
}

/// How many prompts a completions `prompt` holds: a list of strings or of token-id lists
/// is one prompt per item; a string or one token-id list is one.
pub fn prompt_count(prompt: &Value) -> usize {
    match prompt {
        Value::Array(items) if items.iter().all(|i| i.is_string() || i.is_array()) => {
            items.len().max(1)
        }
        _ => 1,
    }
}

/// Rough prompt token count for `usage`: ~4 characters per token, token-id prompts
/// counted exactly.
pub fn estimate_prompt_tokens(prompt: &Value) -> u64 {
    fn chars(v: &Value) -> (u64, u64) {
        // (characters of text, explicit token ids)
        match v {
            Value::String(s) => (s.chars().count() as u64, 0),
            Value::Number(_) => (0, 1),
            Value::Array(items) => items
                .iter()
                .map(chars)
                .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1)),
            Value::Object(map) => map.get("text").map(chars).unwrap_or((0, 0)),
            _ => (0, 0),
        }
    }
    let (text, ids) = chars(prompt);
    (text.div_ceil(4) + ids).max(1)
}

pub fn chat_prompt_tokens(messages: &[ChatMessage]) -> u64 {
    // A few tokens of chat-template framing per message, as real templates add.
    messages
        .iter()
        .map(|m| estimate_prompt_tokens(&m.content) + 4)
        .sum()
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub total_tokens: u64,
    pub completion_tokens: u64,
    /// sglang fills it (`cached_tokens`) only with `--enable-cache-report`: null here.
    pub prompt_tokens_details: Option<()>,
    /// sglang's own field, 0 without a reasoning parser.
    pub reasoning_tokens: u64,
    /// Set by sglang only when there are reasoning tokens: null here.
    pub completion_tokens_details: Option<()>,
}

impl Usage {
    pub fn new(prompt_tokens: u64, completion_tokens: u64) -> Usage {
        Usage {
            prompt_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            completion_tokens,
            prompt_tokens_details: None,
            reasoning_tokens: 0,
            completion_tokens_details: None,
        }
    }
}

/// `DeltaMessage`.
#[derive(Debug, Serialize)]
pub struct Delta<'a> {
    pub role: Option<&'a str>,
    pub content: Option<&'a str>,
    pub reasoning_content: Option<&'a str>,
    pub tool_calls: Option<()>,
}

/// `ChatCompletionResponseStreamChoice`.
#[derive(Debug, Serialize)]
pub struct ChatStreamChoice<'a> {
    pub index: u32,
    pub delta: Delta<'a>,
    pub logprobs: Option<()>,
    pub finish_reason: Option<&'a str>,
    pub matched_stop: Option<u32>,
}

/// `CompletionResponseStreamChoice`.
#[derive(Debug, Serialize)]
pub struct CompletionStreamChoice<'a> {
    pub index: u32,
    pub text: &'a str,
    pub logprobs: Option<()>,
    pub finish_reason: Option<&'a str>,
    pub matched_stop: Option<u32>,
}

/// A streamed chunk: `ChatCompletionStreamResponse` (object `chat.completion.chunk`,
/// choices [`ChatStreamChoice`]) and `CompletionStreamResponse` (object
/// `text_completion`, choices [`CompletionStreamChoice`]) share this envelope.
#[derive(Debug, Serialize)]
pub struct StreamChunk<'a, C> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: &'a [C],
    pub usage: Option<Usage>,
}

/// `ChatMessage` in a non-streamed response.
#[derive(Debug, Serialize)]
pub struct ResponseMessage<'a> {
    pub role: &'static str,
    pub content: &'a str,
    pub reasoning_content: Option<&'a str>,
    pub tool_calls: Option<()>,
}

#[derive(Debug, Serialize)]
pub struct ChatChoice<'a> {
    pub index: u32,
    pub message: ResponseMessage<'a>,
    pub logprobs: Option<()>,
    pub finish_reason: &'a str,
    pub matched_stop: Option<u32>,
}

#[derive(Debug, Serialize)]
pub struct CompletionChoice<'a> {
    pub index: u32,
    pub text: &'a str,
    pub logprobs: Option<()>,
    pub finish_reason: &'a str,
    pub matched_stop: Option<u32>,
}

/// A whole response: `ChatCompletionResponse` (object `chat.completion`, choice
/// [`ChatChoice`]) and `CompletionResponse` (object `text_completion`, choice
/// [`CompletionChoice`]) share this envelope.
#[derive(Debug, Serialize)]
pub struct Response<'a, C> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: Vec<C>,
    pub usage: Usage,
}

/// `ModelCard` in `GET /v1/models`.
#[derive(Debug, Serialize)]
pub struct ModelCard<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    pub root: &'a str,
    pub max_model_len: u64,
}

#[derive(Debug, Serialize)]
pub struct ModelList<'a> {
    pub object: &'static str,
    pub data: [ModelCard<'a>; 1],
}

/// sglang's error body (`ErrorResponse` in its protocol.py), flat rather than OpenAI's
/// `{"error": {...}}` envelope: `{"object": "error", "message", "type", "param", "code"}`.
#[derive(Debug, Serialize)]
pub struct ErrorBody<'a> {
    pub object: &'static str,
    pub message: &'a str,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub param: Option<&'a str>,
    pub code: u16,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_tokens_count_text_and_ids() {
        assert_eq!(estimate_prompt_tokens(&serde_json::json!("abcdefgh")), 2);
        assert_eq!(estimate_prompt_tokens(&serde_json::json!([1, 2, 3])), 3);
        assert_eq!(estimate_prompt_tokens(&serde_json::json!("")), 1);
        let parts = serde_json::json!([{"type": "text", "text": "abcd"}]);
        assert_eq!(estimate_prompt_tokens(&parts), 1);
    }
}
