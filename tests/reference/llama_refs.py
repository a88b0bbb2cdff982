"""What make_model_refs.py and make_lora_refs.py share: llama.cpp (llama-cpp-python) set up the
same way, last-position logits with a fresh KV cache, and how logits are summarised and stored.
"""
import hashlib

import numpy as np
import llama_cpp

N_THREADS = 2


def make_llm(path, n_ctx):
    return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                           seed=0, verbose=False, n_threads=N_THREADS, n_threads_batch=N_THREADS)


def eval_one_by_one(llm, ids):
    """Fresh KV cache, one token per llama_decode; the last position's logits (f32)."""
    llm.reset()
    for t in ids:
        llm.eval([t])
    return np.array(llm.scores[len(ids) - 1], dtype=np.float32)


def f32s(v):
    """Exact JSON number for an f32 value."""
    return float(np.float32(v))


def top_k(logits, k=10):
    order = np.lexsort((np.arange(len(logits)), -logits.astype(np.float64)))[:k]
    return [{"id": int(i), "logit": f32s(logits[i])} for i in order]


def margin(logits):
    """top1 - top2 logit (f64 difference of the two f32 values)."""
    b, a = np.partition(logits, -2)[-2:]
    return float(np.float64(a) - np.float64(b))


def cos(a, b):
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return float(a64 @ b64 / (np.linalg.norm(a64) * np.linalg.norm(b64)))


def cos_maxabs(a, b):
    return cos(a, b), float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def write_logits(path, logits, dtype):
    path.write_bytes(logits.astype("<f4" if dtype == "f32" else "<f2").tobytes())
    return path.name


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
