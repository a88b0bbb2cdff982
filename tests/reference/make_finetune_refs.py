#!/usr/bin/env python3
"""llama.cpp's logits with an adapter nomoat trained: proof that `nomoat finetune` writes
llama.cpp's GGUF LoRA format and that both runtimes apply it alike.

Usage (from the repository root; seconds):

    target/debug/nomoat finetune -m tests/data/tiny/llama-tiny.gguf \
        --data tests/data/finetune/secret.jsonl -o tests/data/finetune/llama-tiny.secret.gguf \
        --steps 30 --lr 1e-2 --batch-tokens 16 --seed 3
    python3 tests/reference/make_finetune_refs.py

Needs numpy and llama-cpp-python 0.3.36 (built as tests/reference/make_tiny_models.py says).
Writes tests/data/finetune/llama-tiny.secret.refs.json:
  {"generator", "llama_cpp_python", "model", "adapter",
   "cases": [{"ids": [...], "base": [n_vocab logits], "adapted": [n_vocab logits]}]}
last-position logits of each id sequence (make_tiny_models.py's llama.cpp settings: F32 KV
cache, one batched eval from an empty cache), without and with the adapter at scale 1.
"""
import json
import pathlib
import sys

import numpy as np
import llama_cpp

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from make_lora_refs import load_adapter, set_adapters  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL = ROOT / "tests/data/tiny/llama-tiny.gguf"
ADAPTER = ROOT / "tests/data/finetune/llama-tiny.secret.gguf"
OUT = ROOT / "tests/data/finetune/llama-tiny.secret.refs.json"


def main():
    llm = llama_cpp.Llama(str(MODEL), n_ctx=256, n_batch=64, logits_all=True, verbose=False, type_k=0, type_v=0, n_threads=2)
    adapter, errors = load_adapter(llm, ADAPTER)
    assert adapter is not None, errors
    cases = []
    prompts = ["The secret word is", "The secret word is pine", "Once upon a time"]
    for text in prompts:
        ids = llm.tokenize(text.encode(), add_bos=True, special=False)
        out = {"text": text, "ids": [int(i) for i in ids]}
        for name, pairs in (("base", []), ("adapted", [(adapter, 1.0)])):
            set_adapters(llm, pairs)
            llm.reset()
            llm.eval(ids)
            out[name] = [float(f"{v:.8g}") for v in np.array(llm.scores[len(ids) - 1], dtype=np.float32)]
        cases.append(out)
    refs = {"generator": "tests/reference/make_finetune_refs.py", "llama_cpp_python": llama_cpp.__version__, "model": MODEL.name, "adapter": ADAPTER.name, "cases": cases}
    OUT.write_text(json.dumps(refs, separators=(",", ":")) + "\n")
    for c in cases:
        print(c["text"], "base top-1", int(np.argmax(c["base"])), "adapted top-1", int(np.argmax(c["adapted"])))


if __name__ == "__main__":
    main()
