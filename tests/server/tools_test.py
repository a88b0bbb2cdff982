#!/usr/bin/env python3
"""Tool calling through a running `nomoat serve` with the official `openai` client.

    python3 tests/server/tools_test.py BASE_URL MODEL_ID

native/tests/tools.rs starts the server (Qwen2.5-Coder 0.5B Instruct, whose chat template has
tool support) and runs this; it exits non-zero on the first failed check. Greedy (temperature 0)
so that streamed and non-streamed calls can be compared exactly.
"""

import json
import sys

import jsonschema
import openai

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Current local time in a city", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}


def check_calls(calls, what):
    assert calls, f"{what}: no tool calls"
    ids = set()
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_") and c.id not in ids, f"{what}: {c}"
        ids.add(c.id)
        assert c.function.name in SCHEMAS, f"{what}: {c.function.name}"
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])
    return [(c.function.name, json.loads(c.function.arguments)) for c in calls]


def main() -> int:
    base_url, model = sys.argv[1], sys.argv[2]
    client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=300)
    question = [{"role": "user", "content": "What is the weather like in Paris right now, in celsius?"}]
    common = dict(model=model, tools=TOOLS, temperature=0, max_tokens=120)

    # required: calls whose arguments fit the tool's parameters
    r = client.chat.completions.create(messages=question, tool_choice="required", **common)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None, choice.message
    calls = check_calls(choice.message.tool_calls, "required")

    # streamed: the same calls, in delta.tool_calls pieces
    acc = {}
    finish = None
    for chunk in client.chat.completions.create(messages=question, tool_choice="required", stream=True, **common):
        if not chunk.choices:
            continue
        d = chunk.choices[0].delta
        assert not d.content, f"text in a tool-call stream: {d.content!r}"
        for tc in d.tool_calls or []:
            slot = acc.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            if tc.id:
                slot["id"] = tc.id
            if tc.function and tc.function.name:
                slot["name"] += tc.function.name
            if tc.function and tc.function.arguments:
                slot["arguments"] += tc.function.arguments
        finish = chunk.choices[0].finish_reason or finish
    streamed = [(acc[i]["name"], json.loads(acc[i]["arguments"])) for i in sorted(acc)]
    assert finish == "tool_calls" and streamed == calls, f"streamed {streamed} ({finish}) != {calls}"
    assert all(acc[i]["id"].startswith("call_") for i in acc), acc

    # max_tokens runs out inside the call: finish_reason "length", neither a call nor the
    # unfinished call's text; streamed the same
    r = client.chat.completions.create(messages=question, tool_choice="required", **dict(common, max_tokens=8))
    cut = r.choices[0]
    assert cut.finish_reason == "length" and not cut.message.tool_calls and not cut.message.content, cut
    pieces = []
    for chunk in client.chat.completions.create(messages=question, tool_choice="required", stream=True, **dict(common, max_tokens=8)):
        if chunk.choices:
            d = chunk.choices[0].delta
            pieces.append((d.content or "", bool(d.tool_calls), chunk.choices[0].finish_reason))
    assert "".join(p[0] for p in pieces) == "" and not any(p[1] for p in pieces) and pieces[-1][2] == "length", pieces

    # a named tool: one call of it; no parallel calls: one call
    r = client.chat.completions.create(messages=question, tool_choice={"type": "function", "function": {"name": "get_time"}}, **common)
    named = check_calls(r.choices[0].message.tool_calls, "named")
    assert [n for n, _ in named] == ["get_time"], named
    r = client.chat.completions.create(messages=question, tool_choice="required", parallel_tool_calls=False, **common)
    assert len(check_calls(r.choices[0].message.tool_calls, "one")) == 1

    # the results back (the client's own message object and tool turns): a text answer. This
    # 0.5B model answers a tool result by writing its call again as text (greedy, with or without
    # the tools shown), so what is checked is the shape; native/tests/tools.rs checks that such
    # a conversation renders as the template does
    first = client.chat.completions.create(messages=question, tool_choice="required", parallel_tool_calls=False, **common).choices[0].message
    results = [{"role": "tool", "tool_call_id": c.id, "content": json.dumps({"city": "Paris", "celsius": 21, "sky": "sunny"})} for c in first.tool_calls]
    convo = question + [first.model_dump(exclude_none=True)] + results
    r = client.chat.completions.create(messages=convo, tool_choice="none", **dict(common, max_tokens=24))
    answer = r.choices[0]
    assert answer.finish_reason in ("stop", "length") and answer.message.content and not answer.message.tool_calls, answer
    assert r.usage.prompt_tokens > 250, r.usage

    # auto and a question no tool answers: text
    r = client.chat.completions.create(messages=[{"role": "user", "content": "Write a Python function that adds two numbers."}], **common)
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls, r.choices[0]

    # a tool_choice naming no tool is a 400 naming it
    try:
        client.chat.completions.create(messages=question, tool_choice={"type": "function", "function": {"name": "nope"}}, **common)
        raise AssertionError("tool_choice naming no tool was accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == "tool_choice" and "nope" in e.body["message"], e.body
    print(f"openai client: tool calls {calls} (streamed the same), cut short, named, single, round trip answer {answer.message.content[:60]!r}, auto text, 400")
    return 0


if __name__ == "__main__":
    sys.exit(main())
