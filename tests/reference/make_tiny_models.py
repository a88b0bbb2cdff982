#!/usr/bin/env python3
"""Tiny seeded-random F32 llama / qwen2 / qwen3 models and llama.cpp reference logits for them.

Writes tests/data/tiny/{llama,qwen2,qwen3}-tiny.gguf with gguf-py and, with llama-cpp-python,
tests/data/tiny/refs.json: for three fixed id sequences (lengths 1, 7, 40) the last-position
logits, and the logits at every position of the 40-token one. Checked by tests/tests/tiny_models.rs.

llama.cpp is run with an F32 KV cache (type_k = type_v = F32; its default F16 cache would round
K and V, and the Q·K product then runs in f16) so that, with F32 weights, its whole forward pass
is f32: ggml's F32 matmul has vec_dot_type F32 (no activation quantization).

Usage: python3 tests/reference/make_tiny_models.py
"""
import json
import os
import sys

import numpy as np
import gguf

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.normpath(os.path.join(HERE, "..", "data", "tiny"))

N_LAYER, N_EMBD, N_HEAD, N_KV_HEAD, HEAD_DIM, N_FF, N_CTX = 2, 64, 4, 2, 16, 128, 256
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def vocab():
    tokens = bytes_to_unicode()  # the 256 byte-level characters, in byte order
    pairs = [("Ġ", "t"), ("h", "e"), ("i", "n"), ("Ġ", "a"), ("r", "e"), ("o", "n"), ("Ġt", "he"), ("e", "r"),
             ("Ġ", "s"), ("a", "t"), ("Ġ", "w"), ("Ġ", "o"), ("e", "n"), ("Ġ", "c"), ("i", "s"), ("o", "r"),
             ("e", "s"), ("Ġ", "b"), ("e", "d"), ("Ġ", "f"), ("in", "g"), ("Ġ", "p"), ("o", "u"), ("a", "n"),
             ("a", "l"), ("a", "r"), ("Ġt", "o"), ("Ġ", "m"), ("Ġo", "f"), ("Ġ", "in"), ("Ġ", "d"), ("Ġ", "h"),
             ("Ġa", "nd"), ("i", "c"), ("a", "s"), ("l", "e"), ("Ġt", "h")]
    merges = []
    for a, b in pairs:
        if a + b in tokens or a not in tokens or b not in tokens:
            continue
        tokens.append(a + b)
        merges.append(f"{a} {b}")
    types = [1] * len(tokens)  # NORMAL
    for s in SPECIALS:
        tokens.append(s)
        types.append(3)  # CONTROL
    return tokens, types, merges


def write_model(arch, path, seed, tied):
    rng = np.random.default_rng(seed)
    tokens, types, merges = vocab()
    n_vocab = len(tokens)
    eot = tokens.index("<|endoftext|>")
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"{arch}-tiny")
    w.add_context_length(N_CTX)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_KV_HEAD)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    if arch == "qwen3":
        w.add_key_length(HEAD_DIM)
        w.add_value_length(HEAD_DIM)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(eot)
    w.add_eos_token_id(eot)
    w.add_add_bos_token(False)

    def t(name, *shape, scale=0.05, mean=0.0):
        # numpy shape (rows, cols) = GGUF ne (cols, rows): weights are [n_out][n_in] row-major
        w.add_tensor(name, (mean + scale * rng.standard_normal(shape)).astype(np.float32))

    q_dim, kv_dim = N_HEAD * HEAD_DIM, N_KV_HEAD * HEAD_DIM
    t("token_embd.weight", n_vocab, N_EMBD, scale=0.5)
    for i in range(N_LAYER):
        b = f"blk.{i}."
        t(b + "attn_norm.weight", N_EMBD, scale=0.1, mean=1.0)
        t(b + "attn_q.weight", q_dim, N_EMBD, scale=0.1)
        t(b + "attn_k.weight", kv_dim, N_EMBD, scale=0.1)
        t(b + "attn_v.weight", kv_dim, N_EMBD, scale=0.1)
        if arch == "qwen2":
            t(b + "attn_q.bias", q_dim, scale=0.1)
            t(b + "attn_k.bias", kv_dim, scale=0.1)
            t(b + "attn_v.bias", kv_dim, scale=0.1)
        if arch == "qwen3":
            t(b + "attn_q_norm.weight", HEAD_DIM, scale=0.1, mean=1.0)
            t(b + "attn_k_norm.weight", HEAD_DIM, scale=0.1, mean=1.0)
        t(b + "attn_output.weight", N_EMBD, q_dim, scale=0.1)
        t(b + "ffn_norm.weight", N_EMBD, scale=0.1, mean=1.0)
        t(b + "ffn_gate.weight", N_FF, N_EMBD, scale=0.1)
        t(b + "ffn_up.weight", N_FF, N_EMBD, scale=0.1)
        t(b + "ffn_down.weight", N_EMBD, N_FF, scale=0.1)
    t("output_norm.weight", N_EMBD, scale=0.1, mean=1.0)
    if not tied:
        t("output.weight", n_vocab, N_EMBD, scale=0.1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return n_vocab


MODELS = [  # (arch, file, seed, tied output head)
    ("llama", "llama-tiny.gguf", 1, False),
    ("qwen2", "qwen2-tiny.gguf", 2, True),
    ("qwen3", "qwen3-tiny.gguf", 3, False),
]


def f32s(v):
    # 8 significant digits: exact enough for float32 (< 1 ulp of float32 rounding), half the size of repr
    return [float(f"{x:.8g}") for x in v]


def sequences(n_vocab):
    rng = np.random.default_rng(1234)
    return [
        ("len1", [17]),
        ("len7", [int(x) for x in rng.integers(0, n_vocab, 7)]),
        ("len40", [int(x) for x in rng.integers(0, n_vocab, 40)]),
    ]


def main():
    import llama_cpp

    os.makedirs(OUT, exist_ok=True)
    refs = {"generator": "tests/reference/make_tiny_models.py", "llama_cpp_python": llama_cpp.__version__, "models": []}
    for arch, file, seed, tied in MODELS:
        path = os.path.join(OUT, file)
        n_vocab = write_model(arch, path, seed, tied)
        llm = llama_cpp.Llama(path, n_ctx=N_CTX, n_batch=64, logits_all=True, verbose=False,
                              type_k=0, type_v=0, n_threads=2)  # GGML_TYPE_F32 KV cache
        assert llm.n_vocab() == n_vocab
        cases = []
        all_pos = None
        for name, ids in sequences(n_vocab):
            llm.reset()
            llm.eval(ids)
            scores = np.array(llm.scores[: len(ids)], dtype=np.float32)
            cases.append({"name": name, "ids": ids, "last": f32s(scores[-1])})
            if name == "len40":
                all_pos = {"case": name, "logits": [f32s(row) for row in scores]}
            print(f"{file} {name}: argmax {int(scores[-1].argmax())}, std {scores[-1].std():.3f}", file=sys.stderr)
        refs["models"].append({"file": file, "arch": arch, "tied_output": tied, "cases": cases, "all_positions": all_pos})
        del llm
    with open(os.path.join(OUT, "refs.json"), "w") as f:
        json.dump(refs, f, separators=(",", ":"))


if __name__ == "__main__":
    main()
