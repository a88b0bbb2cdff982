#!/usr/bin/env python3
"""Reference renderings of chat templates, made with Jinja2 set up as Hugging Face
`transformers` sets it up for `apply_chat_template`.

How to run (from the repository root):

    pip install jinja2 gguf           # tested with Jinja2 3.1.6, gguf 0.19.0
    scripts/fetch-models.sh           # the test models, into $NOMOAT_CACHE/models
    python3 tests/reference/make_chat_refs.py

What it writes (committed; rerunning must reproduce it byte for byte):

  tests/data/chat_refs.json
      {"fixed_time": T, "templates": {name: {"source", "bos_token", "eos_token"}},
       "cases": [{"name", "template", "messages", "add_generation_prompt",
                  "expected" | "error"}]}
      Template "smollm2" is `tokenizer.chat_template` of SmolLM2-135M-Instruct.Q4_1.gguf, with
      its BOS/EOS token texts (tokenizer.ggml.tokens at tokenizer.ggml.bos_token_id /
      eos_token_id); the others are written out below (Gemma 3 and Llama 3.1 style, a
      Qwen2.5-style ChatML, and a template exercising Python string methods, loop controls,
      namespace() and tojson). "error" is the message of an exception the template raised
      through raise_exception().

The environment mirrors transformers' `_compile_jinja_template`/`render_jinja_template`:
ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True) with the loopcontrols
extension, globals raise_exception and strftime_now, and tojson = json.dumps(x,
ensure_ascii=False, indent, separators, sort_keys). The render context is messages,
tools=None, documents=None, add_generation_prompt, bos_token, eos_token. strftime_now uses the
fixed UTC time T (nomoat's ChatTemplate::with_fixed_time(T)) instead of the local clock.
llama.cpp's own template engine may differ from this in corner cases; nomoat follows HF.
"""

import json
import os
from datetime import datetime, timezone
from pathlib import Path

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROOT = Path(__file__).resolve().parent.parent.parent
OUT = ROOT / "tests" / "data" / "chat_refs.json"
MODELS = Path(os.environ.get("NOMOAT_CACHE", Path.home() / ".cache" / "nomoat")) / "models"

FIXED_TIME = 1741435200  # 2025-03-08 12:00:00 UTC


def make_env():
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.fromtimestamp(FIXED_TIME, timezone.utc).strftime(format)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def smollm2_template():
    from gguf import GGUFReader

    r = GGUFReader(str(MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"))

    def field(key):
        return r.fields[key].contents()

    tokens = field("tokenizer.ggml.tokens")
    return {
        "source": field("tokenizer.chat_template"),
        "bos_token": tokens[field("tokenizer.ggml.bos_token_id")],
        "eos_token": tokens[field("tokenizer.ggml.eos_token_id")],
    }


GEMMA3 = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""

LLAMA31 = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {{- "# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Python methods (pycompat), loop controls, namespace(), slicing, filters, tojson variants.
PYCOMPAT = """{%- set ns = namespace(last_user=-1, n=0) %}
{%- for m in messages %}
    {%- if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}
{%- endfor %}
{%- for m in messages %}
    {%- if m.content.strip() == '' %}{% continue %}{% endif %}
    {%- if m.content.startswith('/stop') %}{% break %}{% endif %}
    {%- set ns.n = ns.n + 1 %}
    {%- set text = m.content.split('</think>')[-1].strip() if m.role == 'assistant' else m.content.strip() %}
[{{ loop.index }}/{{ messages|length }}] {{ m.role.upper() }}{{ '*' if loop.index0 == ns.last_user else '' }}: {{ text.replace('\\n', ' | ') }}
{% endfor %}
kept={{ ns.n }} first={{ messages[0].role.capitalize() }} ends={{ messages[-1].content.endswith('?') }} title={{ 'hello world'.title() }}
json={{ messages[:2] | tojson }}
sorted={{ {"b": 1.5, "a": [1, 2.0, none, true, false], "c": "caf\\u00e9 \\"q\\"\\t\\\\"} | tojson(sort_keys=true) }}
indent={{ {"k": [1, {"x": 1e-05}, []], "e": {}} | tojson(indent=2) }}
ascii={{ "é€😀" | tojson(ensure_ascii=true) }} compact={{ [1, {"a": 2}] | tojson(separators=[",", ":"]) }}
big={{ [1e16, 123456789.125, 0.0001, -0.0, 3] | tojson }}
{%- if add_generation_prompt %}
>>> {% endif %}
"""

TEMPLATES = {
    "gemma3": {"source": GEMMA3, "bos_token": "<bos>", "eos_token": "<eos>"},
    "llama31": {"source": LLAMA31, "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "qwen25": {"source": QWEN25, "bos_token": "", "eos_token": "<|im_end|>"},
    "pycompat": {"source": PYCOMPAT, "bos_token": "<s>", "eos_token": "</s>"},
}


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


CONVERSATIONS = {
    "single_user": msgs(("user", "Hello!")),
    "system_user": msgs(("system", "You are terse."), ("user", "What is 2+2?")),
    "multi_turn": msgs(
        ("system", "You are a helpful assistant."),
        ("user", "Hi, who are you?"),
        ("assistant", "I am an assistant."),
        ("user", "Tell me a joke."),
    ),
    "multi_turn_no_system": msgs(
        ("user", "  Spaces around  "),
        ("assistant", "<think>hmm</think> Sure.\nTwo lines."),
        ("user", "And then?"),
    ),
    "unicode": msgs(
        ("system", "Réponds en français. 日本語もOK。"),
        ("user", "Ça va? 😀 \"quotes\" and \\backslash\\"),
        ("assistant", "Très bien — merci! ✓"),
        ("user", "Encore une fois ?"),
    ),
    "loop_controls": msgs(
        ("user", "first"),
        ("assistant", "   "),
        ("user", "second?"),
        ("user", "/stop here"),
        ("user", "never shown"),
    ),
    "bad_alternation": msgs(("user", "one"), ("user", "two")),
}

PLAN = {
    "smollm2": ["single_user", "system_user", "multi_turn", "multi_turn_no_system", "unicode"],
    "gemma3": ["single_user", "system_user", "multi_turn", "unicode", "bad_alternation"],
    "llama31": ["single_user", "system_user", "multi_turn", "unicode"],
    "qwen25": ["single_user", "system_user", "multi_turn", "unicode"],
    "pycompat": ["multi_turn", "multi_turn_no_system", "unicode", "loop_controls"],
}


def main():
    templates = {"smollm2": smollm2_template(), **TEMPLATES}
    env = make_env()
    cases = []
    for tname, convs in PLAN.items():
        t = templates[tname]
        compiled = env.from_string(t["source"])
        for conv in convs:
            for agp in (True, False):
                messages = CONVERSATIONS[conv]
                case = {
                    "name": f"{tname}/{conv}/{'gen' if agp else 'nogen'}",
                    "template": tname,
                    "messages": messages,
                    "add_generation_prompt": agp,
                }
                try:
                    case["expected"] = compiled.render(
                        messages=messages,
                        tools=None,
                        documents=None,
                        add_generation_prompt=agp,
                        bos_token=t["bos_token"],
                        eos_token=t["eos_token"],
                    )
                except jinja2.exceptions.TemplateError as e:
                    case["error"] = str(e)
                cases.append(case)
    out = {"jinja2_version": jinja2.__version__, "fixed_time": FIXED_TIME, "templates": templates, "cases": cases}
    OUT.write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {OUT} ({len(cases)} cases)")


if __name__ == "__main__":
    main()
