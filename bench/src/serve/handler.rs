//! HTTP routing and request validation for the OpenAI-compatible endpoints.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use super::body::ResponseBody;
use super::engine::{Engine, Job, Kind};
use super::wire::{
    chat_prompt_tokens, estimate_prompt_tokens, prompt_count, ChatRequest, CompletionRequest,
    ErrorBody, GenerateRequest, ModelCard, ModelList, StreamOptions, CONTEXT_LENGTH,
    MAX_REQUEST_BYTES,
};

/// Events buffered between generation and the connection; small, so a stalled client
/// stalls generation instead of piling up memory.
const EVENT_QUEUE: usize = 16;

type Reply = Response<ResponseBody>;

/// A request refused before generation: becomes sglang's error reply.
struct Rejection {
    status: StatusCode,
    /// sglang's `type`: "Bad Request" for a body FastAPI could not validate (its
    /// RequestValidationError handler), "BadRequestError" for one the server refused.
    kind: &'static str,
    message: String,
}

fn reject(status: StatusCode, message: impl Into<String>) -> Rejection {
    Rejection {
        status,
        kind: "BadRequestError",
        message: message.into(),
    }
}

fn invalid(message: impl Into<String>) -> Rejection {
    Rejection {
        status: StatusCode::BAD_REQUEST,
        kind: "Bad Request",
        message: message.into(),
    }
}

pub async fn handle(engine: Arc<Engine>, req: Request<Incoming>) -> Result<Reply, Infallible> {
    let path = req.uri().path();
    let reply = match (req.method(), path) {
        (&Method::GET | &Method::HEAD, "/health" | "/health_generate") => {
            plain(StatusCode::OK, ResponseBody::empty(), None)
        }
        (&Method::GET, "/v1/models") => models(&engine),
        (&Method::GET, "/model_info" | "/get_model_info") => model_info(&engine),
        (&Method::GET, "/server_info" | "/get_server_info") => server_info(&engine),
        (&Method::POST, "/v1/chat/completions") => post(engine, req, chat_job).await,
        // sglang declares /generate for POST and PUT.
        (&Method::POST | &Method::PUT, "/generate") => post(engine, req, generate_job).await,
        (&Method::POST, "/v1/completions") => post(engine, req, completion_job).await,
        // Starlette's answers (sglang runs on FastAPI): `{"detail": ...}`, and the
        // route's methods in `Allow` on a 405.
        (_, "/health" | "/health_generate") => method_not_allowed("GET, HEAD"),
        (
            _,
            "/v1/models" | "/model_info" | "/get_model_info" | "/server_info" | "/get_server_info",
        ) => method_not_allowed("GET, HEAD"),
        (_, "/v1/chat/completions" | "/v1/completions") => method_not_allowed("POST"),
        (_, "/generate") => method_not_allowed("POST, PUT"),
        _ => detail(StatusCode::NOT_FOUND, "Not Found"),
    };
    Ok(reply)
}

/// Validates a request body into a job, and whether to stream it.
type MakeJob<T> = fn(&Engine, T) -> Result<(Job, bool), Rejection>;

/// A generation endpoint: its JSON body, validated into a job by `job`, then generated; a body
/// that cannot be read or is refused gets sglang's error reply.
async fn post<T: DeserializeOwned>(
    engine: Arc<Engine>,
    req: Request<Incoming>,
    job: MakeJob<T>,
) -> Reply {
    match read_json::<T>(req).await.and_then(|r| job(&engine, r)) {
        Ok((job, stream)) => generate(engine, job, stream).await,
        Err(r) => error(r.status, r.kind, &r.message),
    }
}

/// Starts the generation: a streamed SSE response right away (headers first, as sglang's
/// StreamingResponse does, even while the request waits for a slot), or the whole JSON
/// once generated.
async fn generate(engine: Arc<Engine>, job: Job, stream: bool) -> Reply {
    if stream {
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        tokio::spawn(engine.stream(job, tx));
        let mut reply = plain(
            StatusCode::OK,
            ResponseBody::Events(rx),
            Some("text/event-stream"),
        );
        reply.headers_mut().insert(
            header::CACHE_CONTROL,
            header::HeaderValue::from_static("no-cache"),
        );
        return reply;
    }
    // Non-streamed: this future waits out the generation; a client that leaves drops it,
    // which frees the slot.
    match engine.complete(job).await {
        Ok(body) => plain(
            StatusCode::OK,
            ResponseBody::full(body),
            Some("application/json"),
        ),
        Err(err) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "InternalServerError",
            &format!("{err:#}"),
        ),
    }
}

fn chat_job(engine: &Engine, req: ChatRequest) -> Result<(Job, bool), Rejection> {
    if req.messages.is_empty() {
        return Err(reject(StatusCode::BAD_REQUEST, "Messages cannot be empty."));
    }
    let (output_tokens, finish_reason) =
        output_length(engine, req.max_completion_tokens.or(req.max_tokens))?;
    let choices = choice_count(req.n, 1)?;
    let job = Job {
        kind: Kind::Chat,
        model: req.model.unwrap_or_else(|| engine.model().to_owned()),
        prompt_tokens: chat_prompt_tokens(&req.messages),
        output_tokens,
        finish_reason,
        include_usage: include_usage(&req.stream_options),
        choices,
    };
    Ok((job, req.stream))
}

fn completion_job(engine: &Engine, req: CompletionRequest) -> Result<(Job, bool), Rejection> {
    if req.prompt.is_null() {
        return Err(reject(StatusCode::BAD_REQUEST, "prompt cannot be null"));
    }
    let (output_tokens, finish_reason) = output_length(engine, req.max_tokens)?;
    let choices = choice_count(req.n, prompt_count(&req.prompt))?;
    let job = Job {
        kind: Kind::Completion,
        model: req.model.unwrap_or_else(|| engine.model().to_owned()),
        prompt_tokens: estimate_prompt_tokens(&req.prompt),
        output_tokens,
        finish_reason,
        include_usage: include_usage(&req.stream_options),
        choices,
    };
    Ok((job, req.stream))
}

fn generate_job(engine: &Engine, req: GenerateRequest) -> Result<(Job, bool), Rejection> {
    let prompt = match (req.text, req.input_ids) {
        (Some(text), _) if !text.is_null() => text,
        (_, Some(ids)) if !ids.is_null() => ids,
        _ => {
            return Err(reject(
                StatusCode::BAD_REQUEST,
                "Either text, input_ids or input_embeds should be provided.",
            ))
        }
    };
    let max_new = req.sampling_params.unwrap_or_default().max_new_tokens;
    let (output_tokens, finish_reason) = output_length(engine, max_new)?;
    let job = Job {
        kind: Kind::Generate,
        model: engine.model().to_owned(),
        prompt_tokens: estimate_prompt_tokens(&prompt),
        output_tokens,
        finish_reason,
        include_usage: false,
        choices: 1,
    };
    Ok((job, req.stream))
}

/// `n` choices per prompt; bounded so one request cannot ask for unbounded work.
fn choice_count(n: u32, prompts: usize) -> Result<u32, Rejection> {
    const MAX_CHOICES: u32 = 128;
    let total = u32::try_from(prompts).unwrap_or(u32::MAX).saturating_mul(n);
    if n == 0 {
        return Err(reject(StatusCode::BAD_REQUEST, "n must be at least 1"));
    }
    if total > MAX_CHOICES {
        return Err(reject(
            StatusCode::BAD_REQUEST,
            format!("{total} choices (n x prompts) asked; at most {MAX_CHOICES}"),
        ));
    }
    Ok(total)
}

fn include_usage(opts: &Option<StreamOptions>) -> bool {
    opts.as_ref().and_then(|o| o.include_usage).unwrap_or(false)
}

/// `max_tokens` given: exactly that many tokens, finish `length`. Absent: the server's
/// default output length, finish `stop` (the "model" chose to end).
fn output_length(
    engine: &Engine,
    max_tokens: Option<u64>,
) -> Result<(usize, &'static str), Rejection> {
    match max_tokens {
        None => Ok((engine.default_output_tokens(), "stop")),
        Some(0) => Err(reject(StatusCode::BAD_REQUEST, "max_tokens must be positive")),
        Some(n) if n > CONTEXT_LENGTH => Err(reject(
            StatusCode::BAD_REQUEST,
            format!(
                "max_tokens is too large: {n}. This model supports at most {CONTEXT_LENGTH} completion tokens."
            ),
        )),
        Some(n) => Ok((n as usize, "length")),
    }
}

async fn read_json<T: DeserializeOwned>(req: Request<Incoming>) -> Result<T, Rejection> {
    // sglang's validate_json_request: only application/json (parameters allowed).
    let media_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase())
        .unwrap_or_default();
    if media_type != "application/json" {
        return Err(invalid(format!(
            "content-type {media_type:?}: Unsupported Media Type: Only 'application/json' is allowed"
        )));
    }
    let body = match Limited::new(req.into_body(), MAX_REQUEST_BYTES)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(err) if err.downcast_ref::<LengthLimitError>().is_some() => {
            return Err(reject(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body larger than {MAX_REQUEST_BYTES} bytes"),
            ))
        }
        Err(err) => return Err(invalid(format!("reading request body: {err}"))),
    };
    serde_json::from_slice(&body).map_err(|err| invalid(format!("invalid request body: {err}")))
}

fn models(engine: &Engine) -> Reply {
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let model = engine.model();
    let list = ModelList {
        object: "list",
        data: [ModelCard {
            id: model,
            object: "model",
            created,
            owned_by: "sglang",
            root: model,
            max_model_len: CONTEXT_LENGTH,
        }],
    };
    json(StatusCode::OK, &list)
}

/// sglang's flat error body (`ErrorResponse`): `{"object": "error", "message", "type",
/// "param": null, "code"}`.
fn error(status: StatusCode, kind: &'static str, message: &str) -> Reply {
    let body = ErrorBody {
        object: "error",
        message,
        kind,
        param: None,
        code: status.as_u16(),
    };
    json(status, &body)
}

/// Starlette's own error body, for requests no route takes.
fn detail(status: StatusCode, detail: &str) -> Reply {
    json(status, &serde_json::json!({ "detail": detail }))
}

fn method_not_allowed(allow: &'static str) -> Reply {
    let mut reply = detail(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed");
    reply
        .headers_mut()
        .insert(header::ALLOW, header::HeaderValue::from_static(allow));
    reply
}

/// GET /model_info (and the deprecated /get_model_info): sglang's fields this server can
/// fill.
fn model_info(engine: &Engine) -> Reply {
    let model = engine.model();
    json(
        StatusCode::OK,
        &serde_json::json!({
            "model_path": model,
            "served_model_name": model,
            "tokenizer_path": model,
            "is_generation": true,
            "preferred_sampling_params": null,
            "weight_version": "default",
            "has_image_understanding": false,
            "has_audio_understanding": false,
        }),
    )
}

/// GET /server_info (and the deprecated /get_server_info): the startup configuration,
/// which bench_serving copies into its results.
fn server_info(engine: &Engine) -> Reply {
    let model = engine.model();
    json(
        StatusCode::OK,
        &serde_json::json!({
            "model_path": model,
            "served_model_name": model,
            "context_length": CONTEXT_LENGTH,
            "max_running_requests": engine.max_running(),
            "stream_interval": engine.tokens_per_chunk(),
            "internal_states": [],
            "version": concat!("eastwest-bench ", env!("CARGO_PKG_VERSION")),
        }),
    )
}

fn json(status: StatusCode, value: &impl serde::Serialize) -> Reply {
    match serde_json::to_vec(value) {
        Ok(body) => plain(status, ResponseBody::full(body), Some("application/json")),
        Err(err) => {
            tracing::error!(%err, "serializing a response");
            plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                ResponseBody::full(Bytes::from_static(b"internal error")),
                None,
            )
        }
    }
}

fn plain(status: StatusCode, body: ResponseBody, content_type: Option<&'static str>) -> Reply {
    let mut reply = Response::new(body);
    *reply.status_mut() = status;
    if let Some(ct) = content_type {
        reply
            .headers_mut()
            .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(ct));
    }
    reply
}
