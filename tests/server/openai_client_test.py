#!/usr/bin/env python3
"""Drives a running `nomoat serve` with the official `openai` Python client.

    python3 tests/server/openai_client_test.py BASE_URL API_KEY MODEL_ID

BASE_URL is e.g. http://127.0.0.1:8080/v1. native/tests/serve.rs starts the server and runs
this script; it exits non-zero on the first failed check. Generations are short and greedy
(temperature 0) so that streamed and non-streamed answers can be compared exactly.
"""

import sys
import time

import openai


def main() -> int:
    base_url, api_key, model_id = sys.argv[1], sys.argv[2], sys.argv[3]
    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=180)
    checks = 0
    t0 = time.time()

    def ok(cond, what):
        nonlocal checks
        if not cond:
            raise AssertionError(what)
        checks += 1

    # models
    models = client.models.list()
    ok([m.id for m in models.data] == [model_id], f"models.list: {models}")

    messages = [{"role": "user", "content": "What is the capital of France?"}]

    # chat, not streamed
    r = client.chat.completions.create(model=model_id, messages=messages, max_tokens=8, temperature=0)
    ok(r.object == "chat.completion", f"object {r.object}")
    ok(r.id.startswith("chatcmpl-"), f"id {r.id}")
    ok(r.model == model_id, f"model {r.model}")
    ok(len(r.choices) == 1, "one choice")
    c = r.choices[0]
    ok(c.index == 0 and c.message.role == "assistant", f"choice {c}")
    ok(isinstance(c.message.content, str) and c.message.content.strip(), f"content {c.message.content!r}")
    ok(c.finish_reason in ("stop", "length"), f"finish_reason {c.finish_reason}")
    u = r.usage
    ok(u.prompt_tokens > 0 and 0 < u.completion_tokens <= 8, f"usage {u}")
    ok(u.total_tokens == u.prompt_tokens + u.completion_tokens, f"usage total {u}")
    chat_text = c.message.content

    # chat, streamed, with usage
    stream = client.chat.completions.create(
        model=model_id, messages=messages, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    ok(len(chunks) >= 3, f"{len(chunks)} chunks")
    ok(all(ch.object == "chat.completion.chunk" for ch in chunks), "chunk objects")
    ok(len({ch.id for ch in chunks}) == 1, "one id for all chunks")
    ok(chunks[0].choices[0].delta.role == "assistant", f"first delta {chunks[0].choices[0].delta}")
    with_choices = [ch for ch in chunks if ch.choices]
    streamed = "".join(ch.choices[0].delta.content or "" for ch in with_choices)
    ok(streamed == chat_text, f"streamed {streamed!r} != {chat_text!r}")
    ok(with_choices[-1].choices[0].finish_reason == c.finish_reason, f"last finish {with_choices[-1]}")
    ok(all(ch.choices[0].finish_reason is None for ch in with_choices[:-1]), "finish_reason only in the last chunk")
    last = chunks[-1]
    ok(last.choices == [] and last.usage is not None, f"usage chunk {last}")
    ok(last.usage.completion_tokens == u.completion_tokens and last.usage.prompt_tokens == u.prompt_tokens, f"stream usage {last.usage} vs {u}")

    # completions, not streamed
    prompt = "The capital of France is"
    r = client.completions.create(model=model_id, prompt=prompt, max_tokens=6, temperature=0)
    ok(r.object == "text_completion", f"object {r.object}")
    ok(len(r.choices) == 1 and isinstance(r.choices[0].text, str) and r.choices[0].text, f"choices {r.choices}")
    ok(r.choices[0].finish_reason in ("stop", "length"), f"finish {r.choices[0].finish_reason}")
    ok(r.usage.completion_tokens <= 6 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, f"usage {r.usage}")
    text = r.choices[0].text

    # completions, streamed
    chunks = list(client.completions.create(model=model_id, prompt=prompt, max_tokens=6, temperature=0, stream=True))
    ok(all(ch.object == "text_completion" for ch in chunks), "completion chunk objects")
    streamed = "".join(ch.choices[0].text for ch in chunks)
    ok(streamed == text, f"streamed {streamed!r} != {text!r}")
    ok(chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason, f"last chunk {chunks[-1]}")

    # errors become the client's exceptions
    try:
        client.chat.completions.create(model=model_id, messages=messages, max_tokens=4, n=2)
        ok(False, "n=2 accepted")
    except openai.BadRequestError as e:
        ok(e.status_code == 400 and "n" == (e.body or {}).get("param"), f"n=2: {e}")
    try:
        openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0).models.list()
        ok(False, "wrong key accepted")
    except openai.AuthenticationError as e:
        ok(e.status_code == 401, f"wrong key: {e}")

    print(f"openai client: {checks} checks passed in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
