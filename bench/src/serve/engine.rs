//! The fake inference engine: admits at most `max_running` requests at once (the rest
//! queue, as sglang's scheduler queues), waits the time to first token, then releases one
//! chunk of tokens every `itl * tokens_per_chunk`, each as its own SSE event.
//!
//! Chunk `c` is due at `start + ttft + itl * (index of its last token)`, computed from the
//! request's start rather than from the previous chunk, so timer lateness never accumulates.
//! Due times are kept with the crate's sub-millisecond timer (`crate::timer`) rather than tokio's 1 ms
//! wheel, which would make every token up to 1 ms late.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::sync::{mpsc, Semaphore, SemaphorePermit};
use tokio::time::Instant;

use super::wire::{
    ChatChoice, ChatStreamChoice, CompletionChoice, CompletionStreamChoice, Delta, NativeFinish,
    NativeMeta, NativeOutput, Response, ResponseMessage, StreamChunk, Usage,
};
use super::{ServeConfig, ServeStats};
use crate::timer::Alarm;

/// Output tokens: short English words, so streamed text looks like text.
const WORDS: [&str; 32] = [
    " the",
    " model",
    " streams",
    " tokens",
    " across",
    " regions",
    " through",
    " an",
    " east",
    " west",
    " gateway",
    " with",
    " mutual",
    " TLS",
    " and",
    " low",
    " latency",
    " between",
    " Frankfurt",
    " Ashburn",
    " every",
    " chunk",
    " is",
    " flushed",
    " as",
    " soon",
    " it",
    " exists",
    " so",
    " timing",
    " stays",
    " honest",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Completion,
    /// sglang's native POST /generate: each event carries the whole text so far.
    Generate,
}

impl Kind {
    /// The `object` of this kind's streamed chunks.
    fn chunk_object(self) -> &'static str {
        match self {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion | Kind::Generate => "text_completion",
        }
    }
}

/// One validated generation request.
#[derive(Debug)]
pub struct Job {
    pub kind: Kind,
    /// Echoed in responses, as sglang echoes the request's `model`.
    pub model: String,
    pub prompt_tokens: u64,
    pub output_tokens: usize,
    /// `length` when `max_tokens` cut the output, `stop` when the "model" ended it.
    pub finish_reason: &'static str,
    pub include_usage: bool,
    /// Choices to generate (`n` × prompts); each streams its own events, `index` 0.. .
    pub choices: u32,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    chunks: AtomicU64,
    running: AtomicUsize,
    waiting: AtomicUsize,
    peak_running: AtomicUsize,
}

pub struct Engine {
    cfg: ServeConfig,
    slots: Semaphore,
    seq: AtomicU64,
    counters: Counters,
}

/// Holds a running slot; keeps the running/waiting gauges right even when the request is
/// dropped half-way (client gone).
struct Admission<'a> {
    _permit: SemaphorePermit<'a>,
    counters: &'a Counters,
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        self.counters.running.fetch_sub(1, Ordering::SeqCst);
    }
}

struct Waiting<'a>(&'a Counters);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Per-request state: seeded RNG, id, timestamps.
struct Request {
    rng: StdRng,
    id: String,
    created: u64,
}

impl Engine {
    pub fn new(cfg: ServeConfig) -> Engine {
        let slots = Semaphore::new(cfg.max_running.max(1));
        Engine {
            cfg,
            slots,
            seq: AtomicU64::new(0),
            counters: Counters::default(),
        }
    }

    pub fn model(&self) -> &str {
        &self.cfg.model
    }

    pub fn default_output_tokens(&self) -> usize {
        self.cfg.default_output_tokens
    }

    pub fn max_running(&self) -> usize {
        self.cfg.max_running
    }

    /// sglang's `--stream-interval`.
    pub fn tokens_per_chunk(&self) -> usize {
        self.cfg.tokens_per_chunk
    }

    pub fn stats(&self) -> ServeStats {
        let c = &self.counters;
        ServeStats {
            requests: c.requests.load(Ordering::SeqCst),
            chunks: c.chunks.load(Ordering::SeqCst),
            running: c.running.load(Ordering::SeqCst),
            waiting: c.waiting.load(Ordering::SeqCst),
            peak_running: c.peak_running.load(Ordering::SeqCst),
        }
    }

    fn begin(&self, kind: Kind) -> Request {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        // Request n of a run with seed s always sees the same randomness.
        let mut rng = StdRng::seed_from_u64(self.cfg.seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let prefix = match kind {
            Kind::Chat => "chatcmpl-",
            Kind::Completion => "cmpl-",
            Kind::Generate => "",
        };
        let id = format!("{prefix}{:032x}", rng.random::<u128>());
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Request { rng, id, created }
    }

    /// Waits for a running slot. `None` only if the slot semaphore was closed, which
    /// nothing does; callers then drop the request.
    async fn admit(&self) -> Option<Admission<'_>> {
        let c = &self.counters;
        c.waiting.fetch_add(1, Ordering::SeqCst);
        let waiting = Waiting(c);
        let permit = self.slots.acquire().await.ok()?;
        drop(waiting);
        let now = c.running.fetch_add(1, Ordering::SeqCst) + 1;
        c.peak_running.fetch_max(now, Ordering::SeqCst);
        Some(Admission {
            _permit: permit,
            counters: c,
        })
    }

    fn sample_ttft(&self, rng: &mut StdRng) -> Duration {
        let base = self.cfg.ttft;
        let j = self.cfg.ttft_jitter;
        if j.is_zero() {
            return base;
        }
        // Uniform in [ttft - jitter, ttft + jitter], floored at zero.
        let j_us = j.as_micros() as i64;
        let off = rng.random_range(-j_us..=j_us);
        let total = base.as_micros() as i64 + off;
        Duration::from_micros(total.max(0) as u64)
    }

    /// Generates a streamed response into `tx`, one SSE event per send. Stops early when
    /// the client goes away (the receiver is dropped), freeing the slot, as sglang aborts.
    pub async fn stream(self: Arc<Self>, job: Job, tx: mpsc::Sender<Bytes>) {
        let mut req = self.begin(job.kind);
        let admission = tokio::select! {
            a = self.admit() => a,
            _ = tx.closed() => return,
        };
        let Some(admission) = admission else { return };
        let start = Instant::now();
        let first = start + self.sample_ttft(&mut req.rng);
        let per_chunk = self.cfg.tokens_per_chunk.max(1);
        let n = job.output_tokens;
        let choices = job.choices.max(1);
        let mut out = Events {
            buf: BytesMut::with_capacity(8 << 10),
            tx: &tx,
            chunks: &self.counters.chunks,
            index: 0,
        };
        let mut text = String::with_capacity(per_chunk * 12);
        // /generate streams the whole text so far in every event, as sglang does.
        let mut so_far = String::new();
        let mut alarm = Alarm::new();
        let model = job.model.as_str();
        let id = req.id.as_str();

        if n == 0 {
            sleep_or_closed(&mut alarm, first, &tx).await;
        }
        let mut emitted = 0usize;
        while emitted < n {
            let in_chunk = per_chunk.min(n - emitted);
            let due = first + self.cfg.itl * (emitted + in_chunk - 1) as u32;
            if !sleep_or_closed(&mut alarm, due, &tx).await {
                return;
            }
            if emitted == 0 && job.kind == Kind::Chat {
                for c in 0..choices {
                    out.index = c;
                    if !out.role_chunk(id, req.created, model).await {
                        return;
                    }
                }
            }
            text.clear();
            for i in emitted..emitted + in_chunk {
                push_token(&mut text, i, &mut req.rng);
            }
            emitted += in_chunk;
            if job.kind == Kind::Generate {
                so_far.push_str(&text);
            }
            for c in 0..choices {
                out.index = c;
                let ok = match job.kind {
                    Kind::Chat => out.chat_delta(id, req.created, model, &text).await,
                    Kind::Generate => {
                        let finish = (emitted == n).then_some(job.finish_reason);
                        out.send(&native(id, &so_far, &job, emitted, finish)).await
                    }
                    // sglang puts the completion's finish_reason on its last text chunk.
                    Kind::Completion => {
                        let finish = (emitted == n).then_some(job.finish_reason);
                        out.completion_text(id, req.created, model, &text, finish)
                            .await
                    }
                };
                if !ok {
                    return;
                }
            }
        }
        let mut finished = true;
        for c in 0..choices {
            out.index = c;
            if n == 0 && job.kind == Kind::Chat && !out.role_chunk(id, req.created, model).await {
                return;
            }
            finished &= match job.kind {
                Kind::Chat => {
                    out.chat_finish(id, req.created, model, job.finish_reason)
                        .await
                }
                Kind::Completion if n == 0 => {
                    out.completion_text(id, req.created, model, "", Some(job.finish_reason))
                        .await
                }
                Kind::Generate if n == 0 => {
                    out.send(&native(id, "", &job, 0, Some(job.finish_reason)))
                        .await
                }
                Kind::Completion | Kind::Generate => true,
            };
        }
        if !finished {
            return;
        }
        if job.include_usage && job.kind != Kind::Generate {
            // No choices, so the choice type is immaterial: both kinds share this chunk.
            let usage = StreamChunk::<ChatStreamChoice> {
                id,
                object: job.kind.chunk_object(),
                created: req.created,
                model,
                choices: &[],
                usage: Some(Usage::new(job.prompt_tokens, n as u64 * u64::from(choices))),
            };
            if !out.send(&usage).await {
                return;
            }
        }
        // Counted before `[DONE]` goes out (and so before the slot is released): a client
        // that has seen `[DONE]`, or a queued request that has started, sees it counted.
        self.counters.requests.fetch_add(1, Ordering::SeqCst);
        if !out.done().await {
            self.counters.requests.fetch_sub(1, Ordering::SeqCst);
        }
        drop(admission);
    }

    /// Generates a whole response, taking as long as streaming it would.
    pub async fn complete(&self, job: Job) -> anyhow::Result<Bytes> {
        let mut req = self.begin(job.kind);
        let admission = self
            .admit()
            .await
            .ok_or_else(|| anyhow::anyhow!("model server is shutting down"))?;
        let start = Instant::now();
        let first = start + self.sample_ttft(&mut req.rng);
        let n = job.output_tokens;
        let last = first + self.cfg.itl * n.saturating_sub(1) as u32;
        Alarm::new().sleep_until(last).await;
        let mut text = String::with_capacity(n * 10);
        for i in 0..n {
            push_token(&mut text, i, &mut req.rng);
        }
        let choices = job.choices.max(1);
        let usage = Usage::new(job.prompt_tokens, n as u64 * u64::from(choices));
        let body = match job.kind {
            Kind::Generate => {
                serde_json::to_vec(&native(&req.id, &text, &job, n, Some(job.finish_reason)))?
            }
            Kind::Chat => serde_json::to_vec(&Response {
                id: &req.id,
                object: "chat.completion",
                created: req.created,
                model: &job.model,
                choices: (0..choices)
                    .map(|index| ChatChoice {
                        index,
                        message: ResponseMessage {
                            role: "assistant",
                            content: &text,
                            reasoning_content: None,
                            tool_calls: None,
                        },
                        logprobs: None,
                        finish_reason: job.finish_reason,
                        matched_stop: None,
                    })
                    .collect(),
                usage,
            })?,
            Kind::Completion => serde_json::to_vec(&Response {
                id: &req.id,
                object: "text_completion",
                created: req.created,
                model: &job.model,
                choices: (0..choices)
                    .map(|index| CompletionChoice {
                        index,
                        text: &text,
                        logprobs: None,
                        finish_reason: job.finish_reason,
                        matched_stop: None,
                    })
                    .collect(),
                usage,
            })?,
        };
        self.counters.requests.fetch_add(1, Ordering::SeqCst);
        drop(admission);
        Ok(Bytes::from(body))
    }
}

/// One /generate response or event: sglang's `{"text", "meta_info"}` with the text so far.
fn native<'a>(
    id: &'a str,
    text: &'a str,
    job: &Job,
    completion_tokens: usize,
    finish: Option<&'static str>,
) -> NativeOutput<'a> {
    NativeOutput {
        text,
        meta_info: NativeMeta {
            id,
            finish_reason: finish.map(|kind| match kind {
                "length" => NativeFinish::Length {
                    length: completion_tokens,
                },
                _ => NativeFinish::Stop { matched: None },
            }),
            prompt_tokens: job.prompt_tokens,
            weight_version: "default",
            completion_tokens,
            cached_tokens: 0,
        },
    }
}

fn push_token(text: &mut String, index: usize, rng: &mut StdRng) {
    let word = WORDS[rng.random_range(0..WORDS.len())];
    // The first token of a reply carries no leading space.
    text.push_str(if index == 0 { &word[1..] } else { word });
}

/// Sleeps until `deadline`; false if the client went away first.
async fn sleep_or_closed(alarm: &mut Alarm, deadline: Instant, tx: &mpsc::Sender<Bytes>) -> bool {
    tokio::select! {
        _ = alarm.sleep_until(deadline) => true,
        _ = tx.closed() => false,
    }
}

/// Encodes SSE events into one reusable buffer and sends each as its own frame.
struct Events<'a> {
    buf: BytesMut,
    tx: &'a mpsc::Sender<Bytes>,
    chunks: &'a AtomicU64,
    /// The choice the next chunk belongs to (`n > 1`, list prompts).
    index: u32,
}

impl Events<'_> {
    /// False when the client is gone (or, impossibly, the chunk failed to serialize).
    async fn send(&mut self, value: &impl Serialize) -> bool {
        self.buf.extend_from_slice(b"data: ");
        if let Err(err) = serde_json::to_writer((&mut self.buf).writer(), value) {
            tracing::error!(%err, "serializing a stream chunk");
            return false;
        }
        self.buf.extend_from_slice(b"\n\n");
        self.push().await
    }

    async fn push(&mut self) -> bool {
        let event = self.buf.split().freeze();
        // Counted before the send, so the count already includes an event the client sees.
        self.chunks.fetch_add(1, Ordering::SeqCst);
        if self.tx.send(event).await.is_err() {
            self.chunks.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        true
    }

    async fn done(&mut self) -> bool {
        self.buf.extend_from_slice(b"data: [DONE]\n\n");
        self.push().await
    }

    async fn role_chunk(&mut self, id: &str, created: u64, model: &str) -> bool {
        self.chat_choice(
            id,
            created,
            model,
            Delta {
                role: Some("assistant"),
                content: Some(""),
                reasoning_content: None,
                tool_calls: None,
            },
            None,
        )
        .await
    }

    async fn chat_delta(&mut self, id: &str, created: u64, model: &str, text: &str) -> bool {
        let delta = Delta {
            role: None,
            content: Some(text),
            reasoning_content: None,
            tool_calls: None,
        };
        self.chat_choice(id, created, model, delta, None).await
    }

    async fn chat_finish(&mut self, id: &str, created: u64, model: &str, reason: &str) -> bool {
        let delta = Delta {
            role: None,
            content: None,
            reasoning_content: None,
            tool_calls: None,
        };
        self.chat_choice(id, created, model, delta, Some(reason))
            .await
    }

    async fn chat_choice(
        &mut self,
        id: &str,
        created: u64,
        model: &str,
        delta: Delta<'_>,
        finish_reason: Option<&str>,
    ) -> bool {
        let choices = [ChatStreamChoice {
            index: self.index,
            delta,
            logprobs: None,
            finish_reason,
            matched_stop: None,
        }];
        self.send(&StreamChunk {
            id,
            object: Kind::Chat.chunk_object(),
            created,
            model,
            choices: &choices,
            usage: None,
        })
        .await
    }

    async fn completion_text(
        &mut self,
        id: &str,
        created: u64,
        model: &str,
        text: &str,
        finish_reason: Option<&str>,
    ) -> bool {
        let choices = [CompletionStreamChoice {
            index: self.index,
            text,
            logprobs: None,
            finish_reason,
            matched_stop: None,
        }];
        self.send(&StreamChunk {
            id,
            object: Kind::Completion.chunk_object(),
            created,
            model,
            choices: &choices,
            usage: None,
        })
        .await
    }
}
