#!/usr/bin/env python3
"""LoRA adapters for the tiny test models and llama.cpp reference logits with them applied.

Usage (from the repository root, after tests/reference/make_tiny_models.py; ~2 minutes on 2 cores):

    python3 tests/reference/make_tiny_lora_refs.py

Needs gguf (gguf-py), numpy and llama-cpp-python 0.3.36. Writes:

  tests/data/tiny/llama-mixed-tiny.gguf   arch llama, the weights of llama-tiny.gguf (same seed)
                                          stored with a different type per projection (MIXED_TYPES)
  tests/data/tiny/lora/<stem>.<adapter>.gguf   llama.cpp GGUF LoRA adapters (see make_lora_refs.py
                                          for the format): general.type "adapter", adapter.type
                                          "lora", adapter.lora.alpha; "<base>.lora_a" GGUF dims
                                          [n_in, r], "<base>.lora_b" GGUF dims [r, n_out]
  tests/data/tiny/lora_refs.json          the references, schema below

Adapters: rank 4, alpha 8 (so alpha/rank = 2), one per projection kind, covering that projection
in every layer ("output" is the single output.weight), plus "all" (every kind of the model at once,
its own draws). A ~ N(0,1)/sqrt(n_in), B ~ N(0,1)*SIGMA_B[kind], drawn in float64 from numpy's
PCG64 seeded with crc32("<stem>.<adapter>"), layer by layer in kind order, A before B, then cast.

llama.cpp semantics (src/llama-graph.cpp build_lora_mm, src/llama-adapter.h get_scale): for each
attached adapter that has "<W name>.lora_a/b":  y = W x + scale * alpha / rank * B (A x), rank =
lora_b's ne[0]; adapters add. The "<W name>" is the name of the tensor the graph multiplies by:
phi3's adapters are on the fused blk.N.attn_qkv.weight (rows q, k, v) and the fused
blk.N.ffn_up.weight (rows gate, up), i.e. the delta is added to the fused product before it is
split. Tied-output models (qwen2-tiny, gemma3-tiny): no "output" adapter. The output head is the
token_embd.weight tensor itself (created TENSOR_DUPLICATED, same name); an adapter naming
output.weight is refused by llama_adapter_lora_init ("does not exist in base model", recorded in
the JSON), and one naming token_embd.weight is validated with the embedding's transposed A/B
layout (llama-adapter.cpp: is_token_embd), which build_lora_mm then cannot multiply at the head
(ggml_mul_mat shape assert), so neither can express an output-head LoRA on a tied model.

llama.cpp settings as in make_tiny_models.py: F32 KV cache (type_k = type_v = 0), n_batch 64,
logits at every position, n_threads 2, each sequence one batched llama_decode from an empty cache.
With F32 weights and F32 adapters llama.cpp's forward pass is then f32 throughout (except
gemma3's GELU, which ggml-cpu evaluates through an f16 table: see "numpy_check").
llama-mixed-tiny has F16/Q8_0/Q4_0 weights: llama.cpp rounds the activations to f16 / quantizes
them to Q8_0 before those matmuls (and to f16 before the F16 adapter's A and B), so for it the
numpy float32 reference ("f32": tests/reference/f32_forward.py over the gguf-py-dequantized
weights, with y += scale*alpha/rank * B(A x) in f32) is stored too, and is the tight reference.

lora_refs.json schema (logit vectors: n_vocab numbers, 8 significant digits; last position only):
{
  "generator", "llama_cpp_python": str, "rank": 4, "alpha": 8.0, "notes": [str],
  "sequences": {"len7": [ids], "len40": [ids]},      # = make_tiny_models.py's sequences()
  "models": [{
     "file": "llama-tiny.gguf",                       # in tests/data/tiny/
     "arch": str, "tied_output": bool,
     "tensor_types": {tensor name: "F32"|"F16"|"Q8_0"|"Q4_0"},   # only for llama-mixed-tiny
     "skipped": [{"adapter": "output", "why": str, "llama_cpp_error": [str]}],   # tied models
     "adapters": [{"name": str, "file": "llama-tiny.attn_q.gguf",   # in tests/data/tiny/lora/
                   "dtype": "f32"|"f16", "rank": 4, "alpha": 8.0, "sigma_b": {kind: std of B},
                   "seed": int,
                   "tensors": [base tensor names covered]}],
     "settings": [{
        "name": "base" | "<adapter>" | "stack" | ...,
        "adapters": [{"file": str, "scale": float}],  # user scales given to llama_set_adapters_lora
        "llama_cpp": {"len7": [logits], "len40": [logits]},
        "f32": {"len7": [...], "len40": [...]},        # only llama-mixed-tiny and gemma3-tiny
        "max_abs_vs_base": {"len7": float, "len40": float},      # llama.cpp, vs the base setting
        "numpy_check": {...}   # max |numpy f32 - llama.cpp| per sequence: "f32_forward" (f32_forward.py,
                               # archs llama/qwen2/gemma3), "tiny_forward" (tiny_forward.py, every
                               # arch; gemma3: with ggml's f16-table GELU), "f32_vs_tiny_forward"
                               # (both numpy forwards, exact GELU); "f32_argmax_equal" where f32 stored
     }]
  }]
}
"""
import json
import os
import sys
import zlib
from pathlib import Path

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "2")

import numpy as np  # noqa: E402
import gguf  # noqa: E402
import llama_cpp  # noqa: E402
import llama_cpp._logger  # noqa: E402

sys.dont_write_bytecode = True
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import make_tiny_models as tiny  # noqa: E402
import make_lora_refs as lora_refs  # noqa: E402
from make_lora_refs import load_adapter, set_adapters  # noqa: E402
from f32_forward import Model as F32Model  # noqa: E402
from tiny_forward import TinyModel  # noqa: E402

OUT = HERE.parent / "data" / "tiny"
LORA = OUT / "lora"
RANK, ALPHA = 4, 8.0
Q = gguf.GGMLQuantizationType

KINDS = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "output"]
PHI3_KINDS = ["attn_qkv", "attn_output", "ffn_up", "ffn_down"]

# std of B's entries (A's: 1/sqrt(n_in)). Chosen so that each adapter moves the last-position
# logits by roughly 0.05..1 (max-abs), see max_abs_vs_base.
SIGMA_B = {"attn_q": 0.1, "attn_k": 0.1, "attn_v": 0.05, "attn_output": 0.05, "attn_qkv": 0.08,
           "ffn_gate": 0.05, "ffn_up": 0.05, "ffn_down": 0.05, "output": 0.05}
# the tied-head models' logits are ~4x larger (|token_embd| 0.5 vs |output| 0.1): smaller B there
SIGMA_SCALE = {"gemma3": 0.5, "qwen2": 0.5}

# llama-mixed-tiny: per layer, a different type for each stacked projection
MIXED_TYPES = {
    "blk.0.attn_q.weight": Q.F32, "blk.0.attn_k.weight": Q.F16, "blk.0.attn_v.weight": Q.Q8_0,
    "blk.0.attn_output.weight": Q.Q4_0,
    "blk.0.ffn_gate.weight": Q.Q8_0, "blk.0.ffn_up.weight": Q.F16, "blk.0.ffn_down.weight": Q.Q4_0,
    "blk.1.attn_q.weight": Q.Q8_0, "blk.1.attn_k.weight": Q.Q8_0, "blk.1.attn_v.weight": Q.F32,
    "blk.1.attn_output.weight": Q.F16,
    "blk.1.ffn_gate.weight": Q.F16, "blk.1.ffn_up.weight": Q.Q8_0, "blk.1.ffn_down.weight": Q.Q8_0,
    "output.weight": Q.Q8_0,
}


def f32s(v):
    return tiny.f32s(v)


def shapes_of(path):
    r = gguf.GGUFReader(str(path))
    arch = r.fields["general.architecture"].contents()
    n_layer = int(r.fields[f"{arch}.block_count"].contents())
    return arch, n_layer, {t.name: (int(t.shape[0]), int(t.shape[1])) for t in r.tensors if len(t.shape) == 2}


def make_pairs(stem, name, kinds, n_layer, shapes, sigma_scale, dtype=np.float32):
    """{base tensor name: (A (r, n_in), B (n_out, r))} in generation order."""
    seed = zlib.crc32(f"{stem}.{name}".encode())
    rng = np.random.default_rng(seed)
    targets = [f"blk.{il}.{k}.weight" for il in range(n_layer) for k in kinds if k != "output"]
    if "output" in kinds:
        targets.append("output.weight")
    pairs = {}
    for t in targets:
        n_in, n_out = shapes[t]
        k = t.split(".")[-2]
        a = (rng.standard_normal((RANK, n_in)) / np.sqrt(n_in)).astype(dtype)
        b = (rng.standard_normal((n_out, RANK)) * SIGMA_B[k] * sigma_scale).astype(dtype)
        pairs[t] = (a, b)
    return seed, pairs


def write_adapter(path, arch, pairs, name):
    """make_lora_refs.py's writer for {base: (a, b)} with this script's ALPHA."""
    lora_refs.write_adapter(path, arch, [(base, a, b) for base, (a, b) in pairs.items()], ALPHA, name)


# ---------------------------------------------------------------------------------------------
# llama.cpp: the ctypes calls are make_lora_refs.py's (load_adapter, set_adapters)


def make_llm(path):
    return llama_cpp.Llama(str(path), n_ctx=tiny.N_CTX, n_batch=64, logits_all=True, verbose=False,
                           type_k=0, type_v=0, n_threads=2)


def eval_last(llm, ids):
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[len(ids) - 1], dtype=np.float32)


def max_abs(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ---------------------------------------------------------------------------------------------


def f32_forward_last(m, ids, loras):
    """tests/reference/f32_forward.py with y += s_eff * (x A^T) B^T on the adapted matmuls."""
    extra = {}
    for pairs, s in loras:
        for name, (a, b) in pairs.items():
            extra.setdefault(name, []).append((a.astype(np.float32), b.astype(np.float32), np.float32(s)))

    def mm(x, name):
        y = F32Model.mm(m, x, name)
        for a, b, s in extra.get(name, []):
            y = y + s * ((x @ a.T) @ b.T)
        return y.astype(np.float32)

    m.mm = mm
    return m.forward(ids, last_only=True)[0]


def run_model(file, seqs, specs, settings, store_f32, extra_doc=None):
    """specs: [(adapter name, kinds, dtype)]; settings: [(name, [(adapter name, user scale)])]."""
    path = OUT / file
    stem = path.stem
    arch, n_layer, shapes = shapes_of(path)
    sig = SIGMA_SCALE.get(arch, 1.0)
    adapters, pairs, docs = {}, {}, []
    for name, kinds, dtype in specs:
        seed, pairs[name] = make_pairs(stem, name, kinds, n_layer, shapes, sig,
                                       np.float16 if dtype == "f16" else np.float32)
        f = LORA / f"{stem}.{name}.gguf"
        write_adapter(f, arch, pairs[name], f"nomoat tiny LoRA {stem}.{name}")
        adapters[name] = f
        docs.append({"name": name, "file": f.name, "dtype": dtype, "rank": RANK, "alpha": ALPHA,
                     "sigma_b": {k: SIGMA_B[k] * sig for k in kinds},
                     "seed": seed, "tensors": list(pairs[name])})

    llm = make_llm(path)
    ptr = {}
    for name, f in adapters.items():
        p, errs = load_adapter(llm, f)
        assert p is not None, (f, errs)
        ptr[name] = p
    doc = {"file": file, "arch": arch, "tied_output": "output.weight" not in shapes}
    if extra_doc:
        doc.update(extra_doc)
    if doc["tied_output"]:
        # an output.weight adapter on a tied model: llama.cpp refuses it
        tmp = LORA / f".{stem}.output_probe.gguf"
        rng = np.random.default_rng(0)
        write_adapter(tmp, arch, {"output.weight": (rng.standard_normal((RANK, tiny.N_EMBD)).astype(np.float32),
                                                    rng.standard_normal((shapes["token_embd.weight"][1], RANK)).astype(np.float32))}, "probe")
        p, errs = load_adapter(llm, tmp)
        tmp.unlink()
        assert p is None
        doc["skipped"] = [{"adapter": "output", "why": "tied output head (no output.weight): llama.cpp "
                           "rejects an output.weight adapter, and a token_embd.weight adapter uses the "
                           "embedding's transposed layout, which its lm-head matmul cannot take",
                           "llama_cpp_error": errs}]
    cpp = {}
    for sname, setting in settings:
        set_adapters(llm, [(ptr[a], s) for a, s in setting])
        cpp[sname] = {n: eval_last(llm, ids) for n, ids in seqs}
    set_adapters(llm, [])
    del llm

    s_eff = ALPHA / RANK
    f32m = F32Model(path) if arch in ("llama", "qwen2", "gemma3") else None
    tm = TinyModel(path)
    out = []
    for sname, setting in settings:
        loras = [(pairs[a], s * s_eff) for a, s in setting]
        e = {"name": sname, "adapters": [{"file": adapters[a].name, "scale": s} for a, s in setting],
             "llama_cpp": {n: f32s(v) for n, v in cpp[sname].items()}}
        chk = {"tiny_forward": {}}
        f32 = {}
        for n, ids in seqs:
            t = tm.forward(ids, loras=loras, gelu="f16_table" if arch == "gemma3" else "exact")[-1]
            chk["tiny_forward"][n] = max_abs(t, cpp[sname][n])
            if f32m is not None:
                f = f32_forward_last(f32m, ids, loras)
                f32[n] = f
                chk.setdefault("f32_forward", {})[n] = max_abs(f, cpp[sname][n])
                t_exact = tm.forward(ids, loras=loras)[-1]
                chk.setdefault("f32_vs_tiny_forward", {})[n] = max_abs(f, t_exact)
        if store_f32:
            e["f32"] = {n: f32s(v) for n, v in f32.items()}
            chk["f32_argmax_equal"] = {n: int(np.argmax(f32[n])) == int(np.argmax(cpp[sname][n])) for n, _ in seqs}
        if sname != "base":
            e["max_abs_vs_base"] = {n: max_abs(cpp[sname][n], cpp["base"][n]) for n, _ in seqs}
        e["numpy_check"] = chk
        out.append(e)
        print(f"{file:22s} {sname:12s} vs base {e.get('max_abs_vs_base', {})} | numpy {json.dumps(chk)}", flush=True)
    doc["adapters"] = docs
    doc["settings"] = out
    return doc


def main():
    LORA.mkdir(parents=True, exist_ok=True)
    # llama-mixed-tiny: llama-tiny's weights (seed 1) in mixed types
    arch, file, seed, tied, _ = tiny.MODELS[0]
    assert file == "llama-tiny.gguf"
    tiny.write_model(arch, str(OUT / "llama-mixed-tiny.gguf"), seed, tied,
                     {"types": MIXED_TYPES, "file_type": gguf.LlamaFileType.MOSTLY_Q8_0})
    seqs = [(n, ids) for n, ids in tiny.sequences(len(tiny.vocab()[0])) if n in ("len7", "len40")]

    doc = {"generator": "tests/reference/make_tiny_lora_refs.py", "llama_cpp_python": llama_cpp.__version__,
           "rank": RANK, "alpha": ALPHA,
           "notes": [
               "See the docstring of tests/reference/make_tiny_lora_refs.py for the schema and semantics.",
               "Effective multiplier of B(Ax): scale * alpha / rank = scale * 2.",
               "llama_cpp: llama.cpp 0.3.36 CPU, F32 KV cache, one batched decode per sequence, last position.",
               "f32: numpy float32 forward (f32_forward.py) over gguf-py-dequantized weights with the LoRA "
               "term in f32 (F16 adapters upcast); stored where llama.cpp is not f32 (quantized weights, "
               "F16 adapter, GELU through an f16 table).",
           ],
           "sequences": dict(seqs), "models": []}

    for file, kinds in [("llama-tiny.gguf", KINDS), ("qwen2-tiny.gguf", KINDS[:-1]),
                        ("qwen3-tiny.gguf", KINDS), ("gemma3-tiny.gguf", KINDS[:-1]),
                        ("phi3-tiny.gguf", PHI3_KINDS + ["output"])]:
        specs = [(k, [k], "f32") for k in kinds] + [("all", kinds, "f32")]
        settings = [("base", [])] + [(k, [(k, 1.0)]) for k in kinds] + [("all", [("all", 1.0)])]
        doc["models"].append(run_model(file, seqs, specs, settings, store_f32=file.startswith("gemma3")))

    specs = [("all", KINDS, "f32"), ("ffn_gate_f16", ["ffn_gate"], "f16")]
    settings = [("base", []), ("all", [("all", 1.0)]), ("ffn_gate_f16_x0.5", [("ffn_gate_f16", 0.5)]),
                ("stack", [("all", 1.0), ("ffn_gate_f16", 0.5)])]
    doc["models"].append(run_model("llama-mixed-tiny.gguf", seqs, specs, settings, store_f32=True,
                                   extra_doc={"tensor_types": {k: v.name for k, v in MIXED_TYPES.items()}}))

    with open(OUT / "lora_refs.json", "w") as f:
        json.dump(doc, f, separators=(",", ":"))
    print(f"wrote {OUT / 'lora_refs.json'} ({(OUT / 'lora_refs.json').stat().st_size} bytes)")


if __name__ == "__main__":
    main()
