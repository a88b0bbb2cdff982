#!/usr/bin/env python3
"""Tiny seeded-random F32 models and llama.cpp reference logits for them.

Writes tests/data/tiny/<model>.gguf with gguf-py (MODELS below) and, with llama-cpp-python,
tests/data/tiny/refs.json: for three fixed id sequences (lengths 1, 7, 40) the last-position
logits, and the logits at every position of the 40-token one. Checked by tests/tests/tiny_models.rs.

llama.cpp is run with an F32 KV cache (type_k = type_v = F32; its default F16 cache would round
K and V, and the Q·K product then runs in f16) so that, with F32 weights, its whole forward pass
is f32: ggml's F32 matmul has vec_dot_type F32 (no activation quantization). Exception: GELU
(gemma3), which ggml-cpu evaluates through an f16 lookup table (ggml-cpu/vec.h GGML_GELU_FP16,
ggml_vec_geglu_f32: y = fp16(gelu(fp16(x))) for -10 < x < 10), which moves gemma3's logits by
up to ~4e-3 from the exact-GELU f32 ones; for the gemma3 models refs.json therefore also holds
the numpy f32 logits (tests/reference/tiny_forward.py, tanh-GELU in f32): "f32_last" in each
case and "f32_logits" in all_positions (argmax equal to llama.cpp's at every position).
Every model entry also records "numpy_f32_max_abs": max |tiny_forward.py - llama.cpp| over all
positions of each sequence (~1e-6 to 1e-5; gemma3: exact GELU, and "<case>_f16_gelu" with
ggml's table GELU emulated).

Models (all: n_embd 64, 4 heads, 2 KV heads, head_dim 16, n_ff 128, vocab 295, eps 1e-6,
rope.freq_base 1e4 unless said; llama.cpp = llama-cpp-python 0.3.36's vendored source):
  llama-tiny, qwen2-tiny (tied, q/k/v biases), qwen3-tiny (q/k norms): 2 layers.
  phi3-tiny: arch phi3, 2 layers, untied. blk.N.attn_qkv.weight [q 64 | k 32 | v 32 rows]
    (llama-graph.cpp build_qkv: views at row offsets 0, n_embd_q, n_embd_q + n_embd_k);
    blk.N.ffn_up.weight has 2*n_ff rows, no ffn_gate: models/phi3.cpp build_ffn(up only,
    LLM_FFN_SWIGLU, LLM_FFN_SEQ) -> ggml_swiglu(up x) = silu(first n_ff) * (last n_ff): the
    FIRST half is the gate. RoPE NeoX (llama-model.cpp llama_model_rope_type: PHI3 -> NEOX);
    Q scaled by 1/sqrt(head_dim) before attention. phi3.rope.dimension_count = 16. general.name
    must not contain "phi3"/"phi-3" (llama-vocab.cpp then wants </s>, <unk>, <s> tokens).
  llama3-tiny: arch llama, 2 layers, untied, plus rope_freqs.weight (F32 [n_rot/2 = 8]) =
    1, 2, ..., 8. No key needed (models/llama.cpp loads it when rope.scaling.type is not
    "longrope"; one tensor shared by all layers). ggml rope: theta_i = p * base^(-2i/n_rot) /
    rope_freqs[i] (ggml-cpu ops.cpp ggml_rope_cache_init: theta/ff). RoPE normal (adjacent pairs).
  gemma3-tiny: arch gemma3, 6 layers, tied, key/value_length 16, sliding_window 8,
    rope.freq_base 1e6; no sliding_window_pattern key -> llama.cpp's default pattern 6
    (models/gemma3.cpp load_swa_pattern(ml, 6); llama-hparams.cpp set_swa_pattern: layer il is
    sliding iff il % 6 < 5): layers 0-4 sliding (window: key j visible from query p iff
    p - j < 8, RoPE base rope_freq_base_train_swa = 10000, as no gemma3.rope.freq_base_swa key
    is written), layer 5 global (causal, base 1e6). RoPE NeoX, q/k RMSNorm before RoPE,
    Q * 1/sqrt(key_length), post-attention and post-ffw RMSNorm, GELU(tanh) gate, x *= sqrt(64).
  gemma3-swa-tiny: the same weights with gemma3.attention.sliding_window_pattern = bool array
    [true x 6] (read by llama_model_base::load_swa_pattern's get_arr, BOOL arrays accepted):
    every layer sliding-window with base 10000; gemma3.rope.freq_base is then unused.
  smollm3-tiny: arch smollm3, 4 layers, tied. Like llama (RoPE normal, SiLU gate) but layer il
    has no RoPE at all when (il + 1) % 4 == 0 (models/smollm3.cpp, n_no_rope_layer_step = 4):
    here layer 3.

Usage: python3 tests/reference/make_tiny_models.py [--only FILE ...]
  (--only: rewrite just those models and their refs.json entries, keeping the others as they are;
  the committed llama/qwen2/qwen3 entries were made by an earlier build of the same version and
  differ from a rerun here by <= 5e-6)
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


def write_model(arch, path, seed, tied, opts=None):
    """Write one tiny model. opts (see MODELS): name, n_layer, rope_freqs (Llama 3.1-style frequency
    factors), sliding_window, swa_pattern (uint32 or list of bools), rope_base, types (tensor name
    -> gguf.GGMLQuantizationType, default F32; quantized with gguf-py's quants module). The draws
    from the seeded generator are the same for every type, so a model that differs only in
    opts["types"] has the same (unrounded) weights."""
    opts = opts or {}
    n_layer = opts.get("n_layer", N_LAYER)
    types = opts.get("types", {})
    rng = np.random.default_rng(seed)
    tokens, types_tok, merges = vocab()
    n_vocab = len(tokens)
    eot = tokens.index("<|endoftext|>")
    w = gguf.GGUFWriter(path, arch)
    # general.name: the file stem, unless opts["name"] (llama.cpp's vocab loader expects </s>, <unk>
    # and <s> tokens when the name contains "phi3" or "phi-3": llama-vocab.cpp, token attributes)
    w.add_name(opts.get("name", os.path.basename(path)[: -len(".gguf")]))
    w.add_context_length(N_CTX)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_KV_HEAD)
    w.add_rope_freq_base(opts.get("rope_base", 10000.0))
    w.add_layer_norm_rms_eps(1e-6)
    if arch in ("qwen3", "gemma3"):
        w.add_key_length(HEAD_DIM)
        w.add_value_length(HEAD_DIM)
    if arch == "phi3":
        w.add_rope_dimension_count(HEAD_DIM)
    if "sliding_window" in opts:
        w.add_sliding_window(opts["sliding_window"])
    if "swa_pattern" in opts:
        w.add_sliding_window_pattern(opts["swa_pattern"])
    w.add_file_type(opts.get("file_type", gguf.LlamaFileType.ALL_F32))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types_tok)
    w.add_token_merges(merges)
    w.add_bos_token_id(eot)
    w.add_eos_token_id(eot)
    w.add_add_bos_token(False)

    def t(name, *shape, scale=0.05, mean=0.0):
        # numpy shape (rows, cols) = GGUF ne (cols, rows): weights are [n_out][n_in] row-major
        a = (mean + scale * rng.standard_normal(shape)).astype(np.float32)
        qt = types.get(name, gguf.GGMLQuantizationType.F32)
        if qt == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, a)
        elif qt == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, a.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(a, qt), raw_dtype=qt)

    q_dim, kv_dim = N_HEAD * HEAD_DIM, N_KV_HEAD * HEAD_DIM
    t("token_embd.weight", n_vocab, N_EMBD, scale=0.5)
    if "rope_freqs" in opts:
        w.add_tensor("rope_freqs.weight", np.asarray(opts["rope_freqs"], dtype=np.float32))
    for i in range(n_layer):
        b = f"blk.{i}."
        t(b + "attn_norm.weight", N_EMBD, scale=0.1, mean=1.0)
        if arch == "phi3":
            t(b + "attn_qkv.weight", q_dim + 2 * kv_dim, N_EMBD, scale=0.1)  # rows: q, k, v
        else:
            t(b + "attn_q.weight", q_dim, N_EMBD, scale=0.1)
            t(b + "attn_k.weight", kv_dim, N_EMBD, scale=0.1)
            t(b + "attn_v.weight", kv_dim, N_EMBD, scale=0.1)
        if arch == "qwen2":
            t(b + "attn_q.bias", q_dim, scale=0.1)
            t(b + "attn_k.bias", kv_dim, scale=0.1)
            t(b + "attn_v.bias", kv_dim, scale=0.1)
        if arch in ("qwen3", "gemma3"):
            t(b + "attn_q_norm.weight", HEAD_DIM, scale=0.1, mean=1.0)
            t(b + "attn_k_norm.weight", HEAD_DIM, scale=0.1, mean=1.0)
        t(b + "attn_output.weight", N_EMBD, q_dim, scale=0.1)
        if arch == "gemma3":
            t(b + "post_attention_norm.weight", N_EMBD, scale=0.1, mean=1.0)
        t(b + "ffn_norm.weight", N_EMBD, scale=0.1, mean=1.0)
        if arch == "phi3":
            t(b + "ffn_up.weight", 2 * N_FF, N_EMBD, scale=0.1)  # rows: gate (silu), then up
        else:
            t(b + "ffn_gate.weight", N_FF, N_EMBD, scale=0.1)
            t(b + "ffn_up.weight", N_FF, N_EMBD, scale=0.1)
        t(b + "ffn_down.weight", N_EMBD, N_FF, scale=0.1)
        if arch == "gemma3":
            t(b + "post_ffw_norm.weight", N_EMBD, scale=0.1, mean=1.0)
    t("output_norm.weight", N_EMBD, scale=0.1, mean=1.0)
    if not tied:
        t("output.weight", n_vocab, N_EMBD, scale=0.1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return n_vocab


GEMMA3 = {"n_layer": 6, "sliding_window": 8, "rope_base": 1e6}
MODELS = [  # (arch, file, seed, tied output head, opts for write_model)
    ("llama", "llama-tiny.gguf", 1, False, None),
    ("qwen2", "qwen2-tiny.gguf", 2, True, None),
    ("qwen3", "qwen3-tiny.gguf", 3, False, None),
    ("phi3", "phi3-tiny.gguf", 4, False, {"name": "tiny-phi"}),
    ("llama", "llama3-tiny.gguf", 5, False, {"rope_freqs": np.linspace(1.0, 8.0, HEAD_DIM // 2)}),
    ("gemma3", "gemma3-tiny.gguf", 6, True, GEMMA3),
    # the same weights (seed), every layer sliding-window: a bool array, all true
    ("gemma3", "gemma3-swa-tiny.gguf", 6, True, {**GEMMA3, "swa_pattern": [True] * GEMMA3["n_layer"]}),
    ("smollm3", "smollm3-tiny.gguf", 7, True, {"n_layer": 4}),
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


def llama_cpp_logits(path, seqs):
    """{case name: [len(ids), n_vocab] f32 logits} from llama.cpp, each case one batched eval from
    an empty cache (F32 KV cache, n_batch 64, logits at every position)."""
    import llama_cpp

    llm = llama_cpp.Llama(path, n_ctx=N_CTX, n_batch=64, logits_all=True, verbose=False,
                          type_k=0, type_v=0, n_threads=2)  # GGML_TYPE_F32 KV cache
    out = {}
    for name, ids in seqs:
        llm.reset()
        llm.eval(ids)
        out[name] = np.array(llm.scores[: len(ids)], dtype=np.float32)
    del llm
    return out


def main():
    import argparse
    import llama_cpp
    sys.dont_write_bytecode = True
    sys.path.insert(0, HERE)
    from tiny_forward import TinyModel

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", action="append", metavar="FILE",
                    help="(re)write only this model and its refs.json entry, keeping the other entries "
                         "of the existing refs.json as they are (repeatable)")
    args = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    refs_path = os.path.join(OUT, "refs.json")
    old = {}
    if args.only:
        assert set(args.only) <= {m[1] for m in MODELS}, args.only
        with open(refs_path) as f:
            old = {m["file"]: m for m in json.load(f)["models"]}
    refs = {"generator": "tests/reference/make_tiny_models.py", "llama_cpp_python": llama_cpp.__version__, "models": []}
    for arch, file, seed, tied, opts in MODELS:
        if args.only and file not in args.only:
            if file in old:
                refs["models"].append(old[file])
            continue
        path = os.path.join(OUT, file)
        n_vocab = write_model(arch, path, seed, tied, opts)
        seqs = sequences(n_vocab)
        got = llama_cpp_logits(path, seqs)
        m = TinyModel(path)
        cases = []
        all_pos = None
        check = {}
        for name, ids in seqs:
            scores = got[name]
            assert scores.shape == (len(ids), n_vocab)
            case = {"name": name, "ids": ids, "last": f32s(scores[-1])}
            # independent numpy f32 forward (tiny_forward.py), every position
            ref = m.forward(ids)
            check[name] = float(np.abs(ref.astype(np.float64) - scores).max())
            if arch == "gemma3":
                # llama.cpp's CPU GELU goes through an f16 table (ggml-cpu vec.h GGML_GELU_FP16):
                # its logits are ~3e-3 off the f32 ones, so the exact-GELU f32 logits are stored too
                check[name + "_f16_gelu"] = float(np.abs(m.forward(ids, gelu="f16_table").astype(np.float64) - scores).max())
                check[name + "_f32_argmax_equal_all_positions"] = bool((ref.argmax(-1) == scores.argmax(-1)).all())
                case["f32_last"] = f32s(ref[-1])
            cases.append(case)
            if name == "len40":
                all_pos = {"case": name, "logits": [f32s(row) for row in scores]}
                if arch == "gemma3":
                    all_pos["f32_logits"] = [f32s(row) for row in ref]
            print(f"{file} {name}: argmax {int(scores[-1].argmax())}, std {scores[-1].std():.3f}, "
                  f"numpy f32 max-abs {check[name]:.2e}"
                  + (f" ({check[name + '_f16_gelu']:.2e} with llama.cpp's f16 GELU)" if arch == "gemma3" else ""),
                  file=sys.stderr)
        refs["models"].append({"file": file, "arch": arch, "tied_output": tied, "cases": cases, "all_positions": all_pos,
                               "numpy_f32_max_abs": check})
    with open(refs_path, "w") as f:
        json.dump(refs, f, separators=(",", ":"))


if __name__ == "__main__":
    main()
