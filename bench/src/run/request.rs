//! One streaming request: send, then read the body frame by frame, timestamping each SSE
//! event the instant the frame completing it arrives.

use std::borrow::Cow;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde::Deserialize;

use super::client::Target;
use super::config::{Backend, RunConfig};
use super::dataset::Prompt;
use super::record::{Failure, RequestRecord};
use super::sse::SseParser;

/// The JSON body for `prompt`, as bench_serving builds it: its defaults
/// (`temperature` 0.0, `ignore_eos` unless `--disable-ignore-eos`), then
/// `--extra-request-body` merged over them.
pub fn request_body(cfg: &RunConfig, model: &str, prompt: &Prompt) -> Bytes {
    if cfg.backend.is_native() {
        // async_request_sglang_generate: sampling in sampling_params, top_p only below 1.
        let mut sampling = serde_json::json!({
            "temperature": cfg.temperature,
            "max_new_tokens": prompt.output_len,
            "ignore_eos": !cfg.disable_ignore_eos,
        });
        if cfg.top_p < 1.0 {
            sampling["top_p"] = serde_json::json!(cfg.top_p);
        }
        let mut body = serde_json::json!({
            "text": prompt.text,
            "sampling_params": sampling,
            "stream": true,
            "lora_path": null,
            "return_logprob": false,
            "return_routed_experts": false,
            "logprob_start_len": -1,
        });
        if let Some(obj) = body.as_object_mut() {
            for (k, v) in &cfg.extra_request_body {
                obj.insert(k.clone(), v.clone());
            }
        }
        return Bytes::from(body.to_string());
    }
    let mut body = if cfg.backend.is_chat() {
        serde_json::json!({
            "model": model,
            "messages": [{"role": "user", "content": prompt.text}],
            "max_completion_tokens": prompt.output_len,
            "stream": true,
        })
    } else {
        serde_json::json!({
            "model": model,
            "prompt": prompt.text,
            "best_of": 1,
            "max_tokens": prompt.output_len,
            "stream": true,
        })
    };
    if let Some(obj) = body.as_object_mut() {
        obj.insert("temperature".into(), serde_json::json!(0.0));
        obj.insert(
            "ignore_eos".into(),
            serde_json::json!(!cfg.disable_ignore_eos),
        );
        for (k, v) in &cfg.extra_request_body {
            obj.insert(k.clone(), v.clone());
        }
    }
    Bytes::from(body.to_string())
}

#[derive(Deserialize)]
struct Chunk<'a> {
    #[serde(default, borrow)]
    choices: Vec<Choice<'a>>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    delta: Option<Delta<'a>>,
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(default, borrow)]
    content: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Usage {
    #[serde(default)]
    completion_tokens: Option<usize>,
}

/// State while a stream is read.
struct StreamState {
    /// sglang's native /generate stream: cumulative text and `meta_info.completion_tokens`.
    native: bool,
    /// Native: completion tokens at the last content event.
    last_tokens: usize,
    start: Instant,
    last_content: Option<Instant>,
    last_event: Option<Instant>,
    done: bool,
    record: RequestRecord,
}

impl StreamState {
    fn on_event(&mut self, data: &[u8], at: Instant) {
        if self.record.error.is_some() {
            return;
        }
        self.last_event = Some(at);
        let data = trim_ascii(data);
        if data == b"[DONE]" {
            self.done = true;
            return;
        }
        if self.native {
            self.on_native_event(data, at);
            return;
        }
        let chunk: Chunk<'_> = match serde_json::from_slice(data) {
            Ok(c) => c,
            Err(e) => {
                let shown = String::from_utf8_lossy(&data[..data.len().min(120)]).into_owned();
                self.record.error = Some(Failure::new("bad SSE data", format!("{e}: {shown}")));
                return;
            }
        };
        if let Some(err) = chunk.error {
            let msg = err
                .get("message")
                .and_then(|m| m.as_str())
                .map(str::to_string)
                .unwrap_or_else(|| err.to_string());
            self.record.error = Some(Failure::new("server error event", msg));
            return;
        }
        let content = chunk.choices.first().and_then(|c| {
            c.delta
                .as_ref()
                .and_then(|d| d.content.as_deref())
                .or(c.text.as_deref())
                .filter(|t| !t.is_empty())
        });
        if let Some(text) = content {
            self.record.generated_text.push_str(text);
            match self.last_content {
                None => self.record.ttft = at.duration_since(self.start).as_secs_f64(),
                Some(prev) => self.record.itl.push(at.duration_since(prev).as_secs_f64()),
            }
            self.last_content = Some(at);
            self.record.content_chunks += 1;
        }
        if let Some(n) = chunk.usage.and_then(|u| u.completion_tokens) {
            self.record.usage_completion_tokens = Some(n);
        }
    }
}

impl StreamState {
    /// bench_serving's native parsing: an event with non-empty text is content; its
    /// `completion_tokens` grew by k since the last one, so the gap counts as k ITLs of
    /// gap/k each (an event that adds no token is skipped).
    fn on_native_event(&mut self, data: &[u8], at: Instant) {
        let event: NativeEvent<'_> = match serde_json::from_slice(data) {
            Ok(e) => e,
            Err(e) => {
                let shown = String::from_utf8_lossy(&data[..data.len().min(120)]).into_owned();
                self.record.error = Some(Failure::new("bad SSE data", format!("{e}: {shown}")));
                return;
            }
        };
        if let Some(err) = event.error {
            self.record.error = Some(Failure::new("server error event", err.to_string()));
            return;
        }
        let Some(text) = event.text.filter(|t| !t.is_empty()) else {
            return;
        };
        let tokens = event
            .meta_info
            .and_then(|m| m.completion_tokens)
            .unwrap_or(self.last_tokens + 1);
        match self.last_content {
            None => self.record.ttft = at.duration_since(self.start).as_secs_f64(),
            Some(prev) => {
                let new = tokens.saturating_sub(self.last_tokens);
                if new == 0 {
                    return;
                }
                let gap = at.duration_since(prev).as_secs_f64() / new as f64;
                self.record.itl.extend(std::iter::repeat_n(gap, new));
            }
        }
        self.last_content = Some(at);
        self.last_tokens = tokens;
        self.record.content_chunks += 1;
        self.record.usage_completion_tokens = Some(tokens);
        // Cumulative: the latest event holds the whole text.
        self.record.generated_text.clear();
        self.record.generated_text.push_str(&text);
    }
}

#[derive(Deserialize)]
struct NativeEvent<'a> {
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
    #[serde(default)]
    meta_info: Option<NativeMeta>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct NativeMeta {
    #[serde(default)]
    completion_tokens: Option<usize>,
}

fn trim_ascii(mut b: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = b {
        if first.is_ascii_whitespace() {
            b = rest
        } else {
            break;
        }
    }
    while let [rest @ .., last] = b {
        if last.is_ascii_whitespace() {
            b = rest
        } else {
            break;
        }
    }
    b
}

/// Runs one request to completion; failures end up in the record, never as `Err`.
pub async fn run_one(
    target: &Target,
    backend: Backend,
    body: Bytes,
    prompt: &Prompt,
    timeout: std::time::Duration,
) -> RequestRecord {
    let start = Instant::now();
    let mut state = StreamState {
        native: backend.is_native(),
        last_tokens: 0,
        start,
        last_content: None,
        last_event: None,
        done: false,
        record: RequestRecord {
            prompt_len: prompt.input_len,
            requested_output_len: prompt.output_len,
            ..Default::default()
        },
    };
    let outcome = tokio::time::timeout(timeout, stream(target, backend, body, &mut state)).await;
    let failure = match outcome {
        Ok(Ok(())) => state.record.error.take(),
        Ok(Err(f)) => Some(f),
        Err(_) => Some(Failure::new(
            "timeout",
            format!("no end of stream within {timeout:?}"),
        )),
    };
    let mut record = state.record;
    record.error = failure.or_else(|| {
        if !state.done {
            Some(Failure::new("stream ended early", "no [DONE] event"))
        } else if record.content_chunks == 0 {
            Some(Failure::new(
                "no content",
                "stream had no non-empty content delta",
            ))
        } else {
            None
        }
    });
    record.e2e = state
        .last_event
        .unwrap_or_else(Instant::now)
        .duration_since(start)
        .as_secs_f64();
    // bench_serving's count: the server's usage when it sends one, else what was asked
    // (exact with ignore_eos; content events are not tokens when a chunk holds several).
    record.output_len = record.usage_completion_tokens.unwrap_or(prompt.output_len);
    record
}

async fn stream(
    target: &Target,
    backend: Backend,
    body: Bytes,
    state: &mut StreamState,
) -> Result<(), Failure> {
    let (mut sender, reused) = target.checkout_reused().await?;
    let resp = match sender
        .send_request(build_request(target, backend, body.clone())?)
        .await
    {
        Ok(resp) => resp,
        // A pooled connection the server closed just as we sent (idle timeout race): the
        // request never reached it, so retry once on a new connection, like HTTP clients
        // do. The clock keeps running from the first attempt.
        Err(e) if reused && (e.is_canceled() || e.is_closed() || e.is_incomplete_message()) => {
            tracing::debug!("pooled connection closed under us ({e}); retrying on a new one");
            sender = target.connect_new().await?;
            sender
                .send_request(build_request(target, backend, body)?)
                .await
                .map_err(|e| Failure::new("send", e.to_string()))?
        }
        Err(e) => return Err(Failure::new("send", e.to_string())),
    };
    let status = resp.status();
    if status != http::StatusCode::OK {
        let snippet = read_snippet(resp.into_body()).await;
        return Err(Failure::new(
            format!("HTTP {}", status.as_u16()),
            format!("{status}: {snippet}"),
        ));
    }
    let content_type = resp
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    if !content_type.is_empty() && !content_type.starts_with("text/event-stream") {
        let snippet = read_snippet(resp.into_body()).await;
        return Err(Failure::new(
            "not SSE",
            format!("content-type {content_type:?}: {snippet}"),
        ));
    }
    let mut body = resp.into_body();
    let mut parser = SseParser::new();
    loop {
        match body.frame().await {
            None => break,
            Some(Err(e)) => {
                state.record.sse_events = parser.events();
                return Err(Failure::new("stream broken", e.to_string()));
            }
            Some(Ok(frame)) => {
                // Stamp before parsing: the bytes are here now.
                let at = Instant::now();
                if let Some(data) = frame.data_ref() {
                    parser.feed(data, &mut |event| state.on_event(event, at));
                }
            }
        }
    }
    let at = Instant::now();
    parser.finish(&mut |event| state.on_event(event, at));
    state.record.sse_events = parser.events();
    if parser.events() == 0 {
        return Err(Failure::new(
            "not SSE",
            "200 response without any SSE data event",
        ));
    }
    drop(body);
    target.checkin(sender);
    Ok(())
}

fn build_request(
    target: &Target,
    backend: Backend,
    body: Bytes,
) -> Result<http::Request<Full<Bytes>>, Failure> {
    let mut req = http::Request::post(format!("{}{}", target.path_prefix, backend.path()))
        .header(http::header::HOST, target.authority.as_str())
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::ACCEPT, "text/event-stream");
    if let Ok(key) = std::env::var("OPENAI_API_KEY") {
        req = req.header(http::header::AUTHORIZATION, format!("Bearer {key}"));
    }
    // --header last, as bench_serving's update() lets them replace the defaults.
    if let Some(headers) = req.headers_mut() {
        for (name, value) in &target.headers {
            headers.insert(name.clone(), value.clone());
        }
    }
    req.body(Full::new(body))
        .map_err(|e| Failure::new("request", e.to_string()))
}

/// Up to ~200 bytes of an error body, for the failure detail.
async fn read_snippet(mut body: hyper::body::Incoming) -> String {
    let mut buf = Vec::new();
    let read = async {
        while buf.len() < 200 {
            match body.frame().await {
                Some(Ok(f)) => {
                    if let Some(d) = f.data_ref() {
                        buf.extend_from_slice(d);
                    }
                }
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), read).await;
    buf.truncate(200);
    String::from_utf8_lossy(&buf).trim().to_string()
}
