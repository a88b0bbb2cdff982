#!/usr/bin/env python3
"""Structured output through a running `nomoat serve`, checked with the `jsonschema` package and
the official `openai` client.

    python3 tests/server/structured_test.py validate REPLIES.json
        REPLIES.json: [{"schema": {...}, "content": "..."}]; every content must parse as JSON
        and validate against its schema (jsonschema, the draft the schema names or 2020-12).
    python3 tests/server/structured_test.py parse BASE_URL API_KEY MODEL_ID
        client.chat.completions.parse with a pydantic model: the reply comes back parsed.

native/tests/structured.rs runs both; the script exits non-zero on the first failed check.
"""

import importlib.metadata
import json
import sys

import jsonschema


def validate(path: str) -> int:
    with open(path) as f:
        replies = json.load(f)
    for i, r in enumerate(replies):
        try:
            value = json.loads(r["content"])
        except json.JSONDecodeError as e:
            raise AssertionError(f"reply {i} is not JSON ({e}): {r['content']!r}")
        cls = jsonschema.validators.validator_for(r["schema"], default=jsonschema.Draft202012Validator)
        cls.check_schema(r["schema"])
        errors = list(cls(r["schema"]).iter_errors(value))
        if errors:
            raise AssertionError(f"reply {i} {r['content']!r} does not fit its schema: {errors[0].message}")
    print(f"{len(replies)} replies parse and validate with jsonschema {importlib.metadata.version('jsonschema')}")
    return 0


def parse(base_url: str, api_key: str, model_id: str) -> int:
    from typing import Literal, Optional

    import openai
    from pydantic import BaseModel, Field

    class City(BaseModel):
        name: str = Field(max_length=16)
        country: Literal["France", "Spain", "Italy"]
        population_millions: int = Field(ge=0, le=50)
        capital: bool
        motto: Optional[str] = Field(default=None, max_length=12)

    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=180)
    messages = [{"role": "user", "content": "Describe Paris as JSON."}]
    for seed in range(3):
        r = client.chat.completions.parse(model=model_id, messages=messages, response_format=City, temperature=1.0, seed=seed, max_tokens=80)
        choice = r.choices[0]
        assert choice.finish_reason == "stop", f"finish_reason {choice.finish_reason}: {choice.message.content!r}"
        city = choice.message.parsed
        assert isinstance(city, City), f"parsed {city!r} from {choice.message.content!r}"
        assert city.country in ("France", "Spain", "Italy") and 0 <= city.population_millions <= 50, city
    # streamed, with the same seed: the same reply
    kwargs = dict(model=model_id, messages=messages, temperature=1.0, seed=5, max_tokens=80, response_format={"type": "json_object"})
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    pieces = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs) if c.choices)
    assert pieces == whole, f"streamed {pieces!r} != {whole!r}"
    assert isinstance(json.loads(whole), dict), whole
    # a schema that cannot compile is a 400 naming it
    try:
        bad = {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "strin"}}}
        client.chat.completions.create(model=model_id, messages=messages, response_format=bad, max_tokens=5)
        raise AssertionError("a bad schema was accepted")
    except openai.BadRequestError as e:
        assert "strin" in str(e) and e.body["param"] == "response_format.json_schema.schema", e.body
    print("openai client: chat.completions.parse with a pydantic model, streamed json_object, 400 for a bad schema")
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "validate":
        sys.exit(validate(sys.argv[2]))
    sys.exit(parse(*sys.argv[2:5]))
