#!/usr/bin/env python3
"""Perplexity of a GGUF over a text with llama.cpp (PyPI llama-cpp-python), scored as
`nomoat perplexity` scores it (runtime/src/generate.rs): non-overlapping windows of N_CTX
token ids, each from an empty cache, the logits at positions N_CTX/2 .. N_CTX-2 predicting
the next id. The ids are nomoat's (`nomoat tokenize`, saved as a JSON list), so both sides
score the same tokens. KV cache types as llama.cpp's -ctk/-ctv: f16, q8_0 (a quantized V
cache needs flash attention, which is on for every type here).

usage: kv_perplexity.py MODEL.gguf IDS.json N_CTX [f16|q8_0|f32 ...]
"""
import json
import math
import sys

import numpy as np
from llama_cpp import Llama

GGML_TYPE = {"f32": 0, "f16": 1, "q8_0": 8}


def perplexity(model, ids, n_ctx, kv):
    llm = Llama(model_path=model, n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, type_k=GGML_TYPE[kv], type_v=GGML_TYPE[kv],
                flash_attn=True, n_threads=2, verbose=False)
    nll, count = 0.0, 0
    for w in range(len(ids) // n_ctx):
        win = ids[w * n_ctx:(w + 1) * n_ctx]
        llm.reset()
        llm.eval(win)
        logits = np.asarray(llm.scores[:n_ctx], dtype=np.float64)
        for j in range(n_ctx // 2, n_ctx - 1):
            row = logits[j]
            m = row.max()
            nll += m + math.log(np.exp(row - m).sum()) - row[win[j + 1]]
            count += 1
    return math.exp(nll / count), count


def main():
    model, ids_file, n_ctx = sys.argv[1], sys.argv[2], int(sys.argv[3])
    ids = json.load(open(ids_file))
    for kv in sys.argv[4:] or ["f16", "q8_0"]:
        ppl, count = perplexity(model, ids, n_ctx, kv)
        print(f"llama.cpp kv={kv}: perplexity {ppl:.4f} over {count} scored tokens", flush=True)


if __name__ == "__main__":
    main()
