#!/usr/bin/env python3
"""Wire-compatibility check: the official OpenAI Python client streams from
`eastwest-bench serve` (chat and completions, with include_usage) and sees exactly the
tokens, finish reason and usage it asked for.

    python3 bench/scripts/openai_client_check.py --base-url http://127.0.0.1:30000/v1

Exits 0 and prints "openai client check: ok" on success, 1 with the reason otherwise.
"""

import argparse
import sys

try:
    import openai
except ImportError:
    sys.exit("openai_client_check: the `openai` package is not importable; run `pip install openai`")


def fail(msg):
    sys.exit(f"openai_client_check: FAILED: {msg}")


def check_chat(client, model, n):
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Say something about gateways."}],
        max_tokens=n,
        stream=True,
        stream_options={"include_usage": True},
    )
    roles, contents, finishes, usages = [], [], [], []
    for chunk in stream:
        if chunk.object != "chat.completion.chunk":
            fail(f"chat chunk object is {chunk.object!r}")
        if chunk.usage is not None:
            usages.append(chunk.usage)
        for choice in chunk.choices:
            if choice.delta.role:
                roles.append(choice.delta.role)
            if choice.delta.content:
                contents.append(choice.delta.content)
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
    if roles != ["assistant"]:
        fail(f"chat: expected one assistant role chunk, got {roles}")
    if len(contents) != n:
        fail(f"chat: expected {n} content chunks, got {len(contents)}")
    if finishes != ["length"]:
        fail(f"chat: expected finish_reason ['length'], got {finishes}")
    if len(usages) != 1 or usages[0].completion_tokens != n or usages[0].prompt_tokens <= 0:
        fail(f"chat: expected one usage chunk with completion_tokens={n}, got {usages}")
    if usages[0].total_tokens != usages[0].prompt_tokens + n:
        fail(f"chat: total_tokens {usages[0].total_tokens} != prompt + completion")
    return "".join(contents)


def check_completion(client, model, n):
    stream = client.completions.create(
        model=model,
        prompt="The east-west gateway",
        max_tokens=n,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts, finishes, usages = [], [], []
    for chunk in stream:
        if chunk.object != "text_completion":
            fail(f"completion chunk object is {chunk.object!r}")
        if chunk.usage is not None:
            usages.append(chunk.usage)
        for choice in chunk.choices:
            if choice.text:
                texts.append(choice.text)
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
    if len(texts) != n:
        fail(f"completions: expected {n} text chunks, got {len(texts)}")
    if finishes != ["length"]:
        fail(f"completions: expected finish_reason ['length'], got {finishes}")
    if len(usages) != 1 or usages[0].completion_tokens != n:
        fail(f"completions: expected one usage chunk with completion_tokens={n}, got {usages}")


def check_non_streamed(client, model, n):
    resp = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=n,
    )
    if resp.choices[0].finish_reason != "length" or resp.usage.completion_tokens != n:
        fail(f"non-streamed chat: unexpected response {resp}")
    if not resp.choices[0].message.content:
        fail("non-streamed chat: empty content")


def check_errors(client, model):
    # sglang's flat error body must come out as the client's typed error with its message.
    try:
        client.chat.completions.create(model=model, messages=[], max_tokens=1)
    except openai.BadRequestError as err:
        if err.status_code != 400 or "Messages cannot be empty" not in str(err):
            fail(f"error: unexpected BadRequestError {err!r}")
    else:
        fail("error: empty messages were accepted")
    try:
        client.get("/nothing", cast_to=object)
    except openai.NotFoundError as err:
        if err.status_code != 404:
            fail(f"error: unexpected NotFoundError {err!r}")
    else:
        fail("error: unknown route answered")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:30000/v1")
    ap.add_argument("--model", default="demo-model")
    ap.add_argument("--max-tokens", type=int, default=12)
    args = ap.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key="unused", max_retries=0, timeout=30)
    models = [m.id for m in client.models.list()]
    if args.model not in models:
        fail(f"/v1/models lists {models}, not {args.model!r}")
    check_chat(client, args.model, args.max_tokens)
    check_completion(client, args.model, args.max_tokens)
    check_non_streamed(client, args.model, args.max_tokens)
    check_errors(client, args.model)
    print(f"openai client check: ok (openai {openai.__version__}, {args.max_tokens} tokens)")


if __name__ == "__main__":
    main()
