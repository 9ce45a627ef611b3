//! `serve` over real HTTP: the sglang SSE shape, non-streamed JSON, models, errors.

use std::net::SocketAddr;

use crate::serve_support::*;
use eastwest_bench::serve::{ModelServer, ServeConfig};
use http::{Method, StatusCode};
use serde_json::{json, Value};

async fn start(cfg: ServeConfig) -> ModelServer {
    ModelServer::start(SocketAddr::from(([127, 0, 0, 1], 0)), cfg)
        .await
        .unwrap()
}

fn content(event: &Value) -> Option<&str> {
    event["choices"][0]["delta"]["content"].as_str()
}

#[tokio::test]
async fn chat_stream_is_role_tokens_finish_usage_done() {
    let server = start(fast_config()).await;
    let body = json!({
        "model": "m1",
        "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": 5,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let events = post_sse(
        server.local_addr(),
        "/v1/chat/completions",
        &body.to_string(),
    )
    .await;
    // role, 5 tokens, finish, usage, [DONE]
    assert_eq!(events.len(), 9, "{events:#?}");
    assert_eq!(events.last().unwrap().data, "[DONE]");
    let chunks: Vec<Value> = events[..8].iter().map(Event::json).collect();
    let id = chunks[0]["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-"));
    for c in &chunks {
        assert_eq!(c["id"], id);
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["model"], "m1");
        assert!(c["created"].as_u64().unwrap() > 0);
    }
    let role = &chunks[0]["choices"][0];
    assert_eq!(role["index"], 0);
    assert_eq!(role["delta"]["role"], "assistant");
    assert_eq!(role["delta"]["content"], "");
    assert_eq!(role["finish_reason"], Value::Null);
    for c in &chunks[1..6] {
        let choice = &c["choices"][0];
        assert!(!content(c).unwrap().is_empty());
        assert_eq!(choice["delta"]["role"], Value::Null);
        assert_eq!(choice["finish_reason"], Value::Null);
        assert_eq!(choice["logprobs"], Value::Null);
        assert_eq!(choice["matched_stop"], Value::Null);
    }
    let finish = &chunks[6]["choices"][0];
    assert_eq!(finish["finish_reason"], "length");
    assert_eq!(finish["delta"]["content"], Value::Null);
    let usage = &chunks[7];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 5);
    let prompt = usage["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt > 0);
    assert_eq!(usage["usage"]["total_tokens"], prompt + 5);
    // sglang's UsageInfo without cache report or reasoning parser: details null.
    assert_eq!(usage["usage"]["prompt_tokens_details"], Value::Null);
    assert_eq!(usage["usage"]["completion_tokens_details"], Value::Null);
    assert_eq!(usage["usage"]["reasoning_tokens"], 0);
    assert_eq!(usage["usage"].as_object().unwrap().len(), 6);
    assert_eq!(server.stats().requests, 1);
    assert_eq!(server.stats().chunks, 9);
}

#[tokio::test]
async fn chat_stream_without_usage_and_with_multi_token_chunks() {
    let server = start(ServeConfig {
        tokens_per_chunk: 3,
        ..fast_config()
    })
    .await;
    let body = json!({
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 7,
        "stream": true,
    });
    let events = post_sse(
        server.local_addr(),
        "/v1/chat/completions",
        &body.to_string(),
    )
    .await;
    // role, 3 content chunks (3 + 3 + 1 tokens), finish, [DONE]; no usage chunk
    assert_eq!(events.len(), 6, "{events:#?}");
    let words: Vec<usize> = events[1..4]
        .iter()
        .map(|e| content(&e.json()).unwrap().split_whitespace().count())
        .collect();
    assert_eq!(words, [3, 3, 1]);
    assert_eq!(events[4].json()["choices"][0]["finish_reason"], "length");
    assert_eq!(events[5].data, "[DONE]");
}

#[tokio::test]
async fn completion_stream_puts_finish_on_last_text_chunk() {
    let server = start(fast_config()).await;
    let body = json!({
        "model": "m",
        "prompt": "The gateway",
        "max_tokens": 4,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let events = post_sse(server.local_addr(), "/v1/completions", &body.to_string()).await;
    // 4 text chunks (the last with finish_reason), usage, [DONE]
    assert_eq!(events.len(), 6, "{events:#?}");
    for (i, e) in events[..4].iter().enumerate() {
        let c = e.json();
        assert_eq!(c["object"], "text_completion");
        assert!(c["id"].as_str().unwrap().starts_with("cmpl-"));
        assert!(!c["choices"][0]["text"].as_str().unwrap().is_empty());
        let want = if i == 3 { json!("length") } else { Value::Null };
        assert_eq!(c["choices"][0]["finish_reason"], want);
    }
    let usage = events[4].json();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 4);
    assert_eq!(events[5].data, "[DONE]");
}

#[tokio::test]
async fn default_output_length_ends_with_stop() {
    let server = start(ServeConfig {
        default_output_tokens: 3,
        ..fast_config()
    })
    .await;
    let body =
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true});
    let events = post_sse(
        server.local_addr(),
        "/v1/chat/completions",
        &body.to_string(),
    )
    .await;
    let tokens = events
        .iter()
        .filter(|e| e.data != "[DONE]" && content(&e.json()).is_some_and(|c| !c.is_empty()))
        .count();
    assert_eq!(tokens, 3);
    assert_eq!(
        events[events.len() - 2].json()["choices"][0]["finish_reason"],
        "stop"
    );
}

#[tokio::test]
async fn non_streamed_chat_and_completion() {
    let server = start(fast_config()).await;
    let addr = server.local_addr();
    let body =
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6});
    let (status, chat) =
        json_body(post(addr, "/v1/chat/completions", &body.to_string()).await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(chat["object"], "chat.completion");
    assert_eq!(chat["model"], "m");
    let choice = &chat["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(
        choice["message"]["content"]
            .as_str()
            .unwrap()
            .split_whitespace()
            .count(),
        6
    );
    assert_eq!(choice["finish_reason"], "length");
    assert_eq!(chat["usage"]["completion_tokens"], 6);

    let body = json!({"prompt": [1, 2, 3], "max_tokens": 2});
    let (status, completion) =
        json_body(post(addr, "/v1/completions", &body.to_string()).await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(completion["object"], "text_completion");
    assert_eq!(
        completion["model"], "demo-model",
        "no model named: the served one"
    );
    assert_eq!(completion["choices"][0]["finish_reason"], "length");
    assert_eq!(
        completion["usage"]["prompt_tokens"], 3,
        "token-id prompts count exactly"
    );
    assert_eq!(server.stats().requests, 2);
    assert_eq!(server.stats().chunks, 0);
}

#[tokio::test]
async fn same_seed_same_text() {
    let body =
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20})
            .to_string();
    let mut texts = Vec::new();
    for _ in 0..2 {
        let server = start(ServeConfig {
            seed: 42,
            ..fast_config()
        })
        .await;
        let (_, chat) =
            json_body(post(server.local_addr(), "/v1/chat/completions", &body).await).await;
        texts.push((
            chat["id"].clone(),
            chat["choices"][0]["message"]["content"].clone(),
        ));
    }
    assert_eq!(texts[0], texts[1]);
}

#[tokio::test]
async fn models_and_health() {
    let server = start(ServeConfig {
        model: "qwen-demo".into(),
        ..fast_config()
    })
    .await;
    let (status, models) =
        json_body(request(server.local_addr(), Method::GET, "/v1/models", None).await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "qwen-demo");
    assert_eq!(models["data"][0]["object"], "model");
    let health = request(server.local_addr(), Method::GET, "/health", None).await;
    assert_eq!(health.status(), StatusCode::OK);
}

#[tokio::test]
async fn errors_are_sglang_error_json() {
    let server = start(fast_config()).await;
    let addr = server.local_addr();
    // (body, status, sglang's "type", message part): a body FastAPI cannot validate is
    // "Bad Request" (sglang's RequestValidationError handler), one sglang refuses is
    // "BadRequestError" (its create_error_response).
    let cases: [(&str, Option<&str>, &str, &str); 4] = [
        (
            "/v1/chat/completions",
            Some("{not json"),
            "Bad Request",
            "line 1 column 2",
        ),
        (
            "/v1/chat/completions",
            Some(r#"{"model":"m"}"#),
            "Bad Request",
            "missing field `messages`",
        ),
        (
            "/v1/chat/completions",
            Some(r#"{"messages":[]}"#),
            "BadRequestError",
            "Messages cannot be empty",
        ),
        (
            "/v1/completions",
            Some(r#"{"prompt":"x","max_tokens":0}"#),
            "BadRequestError",
            "max_tokens must be positive",
        ),
    ];
    for (path, body, kind, want_msg) in cases {
        let (status, err) = json_body(request(addr, Method::POST, path, body).await).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path} {body:?}: {err}");
        let keys: Vec<&String> = err.as_object().unwrap().keys().collect();
        assert_eq!(keys.len(), 5, "flat, five keys: {err}");
        assert_eq!(err["object"], "error");
        assert_eq!(err["type"], kind, "{err}");
        assert!(err["param"].is_null());
        assert_eq!(err["code"], 400);
        let msg = err["message"].as_str().unwrap();
        assert!(msg.contains(want_msg), "{path}: {msg:?} lacks {want_msg:?}");
    }

    // Not JSON: 400 whatever the body, as sglang's validate_json_request.
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = build(
        Method::POST,
        "/v1/chat/completions",
        Some(r#"{"messages":[{"role":"user","content":"hi"}]}"#),
    );
    req.headers_mut()
        .insert("content-type", "text/plain".parse().unwrap());
    let (status, err) = json_body(send_h1(tcp, req).await).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(err["type"], "Bad Request");
    assert!(err["message"]
        .as_str()
        .unwrap()
        .contains("Only 'application/json' is allowed"));

    // No route / wrong method: Starlette's bodies, and Allow on 405.
    let resp = request(addr, Method::GET, "/v1/chat/completions", None).await;
    let allow = resp.headers().get("allow").cloned();
    let (status, err) = json_body(resp).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(err, json!({"detail": "Method Not Allowed"}));
    assert_eq!(allow.unwrap(), "POST");
    let resp = request(addr, Method::POST, "/v1/models", Some("{}")).await;
    assert_eq!(resp.headers().get("allow").unwrap(), "GET, HEAD");
    let (status, err) = json_body(request(addr, Method::GET, "/v2/nothing", None).await).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(err, json!({"detail": "Not Found"}));

    // The server is fine afterwards.
    let body =
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).to_string();
    let (status, _) = json_body(post(addr, "/v1/chat/completions", &body).await).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn model_and_server_info_as_sglang_names_them() {
    let server = start(fast_config()).await;
    let addr = server.local_addr();
    for path in ["/model_info", "/get_model_info"] {
        let (status, info) = json_body(request(addr, Method::GET, path, None).await).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        assert_eq!(info["model_path"], "demo-model");
        assert_eq!(info["is_generation"], true);
    }
    for path in ["/server_info", "/get_server_info"] {
        let (status, info) = json_body(request(addr, Method::GET, path, None).await).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        assert_eq!(info["max_running_requests"], 256);
        assert!(info["version"]
            .as_str()
            .unwrap()
            .starts_with("eastwest-bench"));
    }
}

#[tokio::test]
async fn streams_over_http2() {
    let server = start(fast_config()).await;
    let body =
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": true})
            .to_string();
    let tcp = tokio::net::TcpStream::connect(server.local_addr())
        .await
        .unwrap();
    let resp = send_h2(
        tcp,
        build(
            Method::POST,
            "http://model/v1/chat/completions",
            Some(&body),
        ),
    )
    .await;
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let events = sse_events(resp).await;
    assert_eq!(
        events.len(),
        6,
        "role, 3 tokens, finish, [DONE]: {events:#?}"
    );
}

/// sglang's native /generate: every event carries the text so far and meta_info, the last
/// one the finish reason; not streamed, one JSON object.
#[tokio::test]
async fn native_generate_streams_cumulative_text_with_meta_info() {
    let server = start(fast_config()).await;
    let addr = server.local_addr();
    let body =
        json!({"text": "hi", "sampling_params": {"max_new_tokens": 3}, "stream": true}).to_string();
    let events = post_sse(addr, "/generate", &body).await;
    assert_eq!(events.len(), 4, "3 tokens, [DONE]: {events:#?}");
    assert_eq!(events[3].data, "[DONE]");
    let mut previous = String::new();
    for (i, e) in events[..3].iter().enumerate() {
        let v = e.json();
        let text = v["text"].as_str().unwrap().to_string();
        assert!(
            text.starts_with(&previous) && text.len() > previous.len(),
            "cumulative"
        );
        previous = text;
        assert_eq!(v["meta_info"]["completion_tokens"], i + 1);
        let finish = &v["meta_info"]["finish_reason"];
        if i < 2 {
            assert!(finish.is_null());
        } else {
            assert_eq!(*finish, json!({"type": "length", "length": 3}));
        }
    }
    let body = json!({"text": "hi", "sampling_params": {"max_new_tokens": 2}}).to_string();
    let (status, v) = json_body(post(addr, "/generate", &body).await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["meta_info"]["completion_tokens"], 2);
    assert_eq!(v["text"].as_str().unwrap().split(' ').count(), 2);
    let (status, err) = json_body(post(addr, "/generate", "{}").await).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(err["object"], "error");
}

/// `n > 1` and list prompts: one choice per (prompt, n), each with its own index; usage
/// counts them all.
#[tokio::test]
async fn n_choices_and_list_prompts_return_that_many_choices() {
    let server = start(fast_config()).await;
    let addr = server.local_addr();
    let body = json!({
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2, "n": 2, "stream": true,
        "stream_options": {"include_usage": true},
    })
    .to_string();
    let events = post_sse(addr, "/v1/chat/completions", &body).await;
    let mut content = [0, 0];
    let mut finished = [0, 0];
    for e in &events[..events.len() - 1] {
        let v = e.json();
        if let Some(choice) = v["choices"].get(0) {
            let i = choice["index"].as_u64().unwrap() as usize;
            if choice["delta"]["content"]
                .as_str()
                .is_some_and(|c| !c.is_empty())
            {
                content[i] += 1;
            }
            if choice["finish_reason"].is_string() {
                finished[i] += 1;
            }
        } else {
            assert_eq!(v["usage"]["completion_tokens"], 4, "2 choices x 2 tokens");
        }
    }
    assert_eq!(content, [2, 2]);
    assert_eq!(finished, [1, 1]);

    let body = json!({"prompt": ["a", "b"], "n": 2, "max_tokens": 3}).to_string();
    let (status, v) = json_body(post(addr, "/v1/completions", &body).await).await;
    assert_eq!(status, StatusCode::OK);
    let indices: Vec<u64> = v["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indices, [0, 1, 2, 3], "2 prompts x n=2");
    assert_eq!(v["usage"]["completion_tokens"], 12);
    let (status, _) = json_body(
        post(
            addr,
            "/v1/completions",
            &json!({"prompt": "a", "n": 0}).to_string(),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}
