#!/usr/bin/env python3
"""LoRA adapter fixtures and llama.cpp reference logits for nomoat's LoRA support.

How to run (from the repository root; a few minutes on 2 cores):

    pip install llama-cpp-python==0.3.36 gguf numpy     # CPU build; tested with gguf 0.19, numpy 2.4
    scripts/fetch-models.sh                             # the three test models, into $NOMOAT_CACHE/models
    python3 tests/reference/make_lora_refs.py           # all three models
    python3 tests/reference/make_lora_refs.py --model gemma-3-270m-q4_k_m.gguf   # just one
    python3 tests/reference/make_lora_refs.py --model qwen2.5-coder-0.5b-instruct.gguf  # Qwen only
    python3 tests/reference/make_lora_refs.py --no-f32  # skip the numpy float32 cross-check
    python3 tests/reference/make_lora_refs.py --layer-stride 3   # adapters on layers 0, 3, 6, ...
                                  # only (default: the committed files' stride, 1 for SmolLM2 and
                                  # Gemma 3, 3 for Qwen2.5-Coder)

Everything is deterministic: adapter values come from numpy's PCG64 generator seeded with
crc32("<stem>.<adapter>"), llama.cpp runs with a fixed thread count and no sampling. Rerunning
on the same machine and library versions reproduces every file byte for byte (llama.cpp's CPU
kernels depend on the CPU features, see "llama_cpp_system_info" in the JSON).

What it writes, for each model <stem> (file name without .gguf), into tests/data/lora/:

  <stem>.attn_r8.gguf        LoRA on attn_q, attn_k, attn_v, attn_output of every layer;
                             rank 8, adapter.lora.alpha 16, F32 tensors
  <stem>.ffn_r16.gguf        LoRA on ffn_gate, ffn_up, ffn_down of every layer;
                             rank 16, adapter.lora.alpha 8, F16 tensors
  <stem>.wrong_shape.gguf    (SmolLM2 only) negative fixture that llama.cpp refuses: see below
  <stem>.<prompt>.<setting>.logits.<f32|f16>   llama.cpp last-position logits
  <stem>.json                everything else (adapters, cases, checks), described in its "notes"

Qwen2.5-Coder 0.5B Instruct (qwen2; the regression fixture for LoRA on long rows, see
QWEN_ADAPTERS below) gets its own adapters, prompts and settings instead:
  <stem>.down_r4.gguf        LoRA on ffn_down (lora_a n_in = n_ff = 4864) of layers 0, 3, ..., 21;
                             rank 4, adapter.lora.alpha 8, F16 tensors
  <stem>.all_r2.gguf         LoRA on attn_q, attn_k, attn_v, attn_output, ffn_gate, ffn_up, ffn_down
                             of layers 0, 3, ..., 21; rank 2, adapter.lora.alpha 1, F16 tensors
  prompts short (4 tokens), chat64 (64: one full 64-token nomoat prefill batch), code96 (96: two);
  settings base, down_r4 x1, all_r2 x1, down_r4 x1 plus all_r2 x1 ("stack"); f16 logits; the
  llama.cpp self-checks below use down_r4 in place of attn_r8 (repeat check at scale 1).

Adapter file format (llama.cpp's, as written by convert_lora_to_gguf.py and read by
src/llama-adapter.cpp llama_adapter_lora_init_impl):
  * KV: general.architecture = the base model's architecture ("llama", "gemma3"),
    general.type = "adapter", adapter.type = "lora", adapter.lora.alpha (FLOAT32), general.name.
  * For every adapted base matrix W named "<base>" (e.g. "blk.3.attn_q.weight", GGUF dims
    ne = [n_in, n_out]) two tensors:
        "<base>.lora_a"   GGUF dims [n_in, r]    (numpy array (r, n_in))
        "<base>.lora_b"   GGUF dims [r, n_out]   (numpy array (n_out, r))
    llama.cpp checks W.ne[0] == a.ne[0], W.ne[1] == b.ne[1] and a.ne[1] == b.ne[0] and throws
    "tensor '<base>' has incorrect shape (hint: maybe wrong base model?)" otherwise.
  * Values: A ~ N(0, 1) / sqrt(n_in), B ~ N(0, 1) * SIGMA_B[arch][adapter], drawn in float64
    and cast to the stored type, layer by layer, in the target order listed above, A before B.

What llama.cpp computes (src/llama-graph.cpp build_lora_mm, src/llama-adapter.h get_scale,
src/llama-context.cpp set_adapters_lora):
    y = W x + sum over attached adapters that have "<W's name>.lora_a/b" of
              scale_eff * (B (A x)),   scale_eff = user_scale * alpha / rank
  with rank = b.ne[0]; if adapter.lora.alpha is absent or 0, scale_eff = user_scale.
  Adapters are a set {adapter -> user_scale} on the context; a user_scale of exactly 0.0 drops
  the adapter from the graph. Several adapters add their deltas to the same matmul output.
  A x and B (A x) are separate mul_mats on the unquantized activations (F16 adapters: ggml's
  CPU F16 mul_mat rounds the activation operand to f16, i.e. x and A x are rounded to f16).

Settings per prompt (the prompts are evaluated in one batch, n_ctx 512; the last position's
logits are stored): base (no adapter); attn_r8 x0.5; attn_r8 x1; ffn_r16 x1; attn_r8 x1 plus
ffn_r16 x0.5 ("stack"). See the JSON "checks" for llama.cpp's self-checks (scale 0, alpha
equivalence, detaching, same-tensor stacking) and "f32_vs_llamacpp" for the comparison with
tests/reference/f32_forward.py extended with the same LoRA formula in float32.

The negative fixture <stem>.wrong_shape.gguf (SmolLM2): valid pairs for blk.0.attn_k and
blk.0.attn_v, and for blk.0.attn_q a lora_a of GGUF dims [640, 8] (n_in 640 instead of 576)
with a correct lora_b [8, 576]. llama_adapter_lora_init returns NULL; the logged error is in
the JSON ("wrong_shape").
"""

import argparse
import ctypes
import json
import os
import sys
import tempfile
import zlib
from pathlib import Path

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "2")

import numpy as np  # noqa: E402
import gguf  # noqa: E402
import llama_cpp  # noqa: E402
import llama_cpp._logger  # noqa: E402

sys.dont_write_bytecode = True  # no __pycache__ next to the committed scripts
sys.path.insert(0, str(Path(__file__).resolve().parent))
from f32_forward import Model, models_dir  # noqa: E402
from llama_refs import cos, eval_one_by_one, make_llm, margin, sha256, top_k, write_logits  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
OUT_DIR = REPO / "tests" / "data" / "lora"

N_CTX = 512
MODELS = ["SmolLM2-135M-Instruct.Q4_1.gguf", "gemma-3-270m-q4_k_m.gguf",
          "qwen2.5-coder-0.5b-instruct.gguf"]
LOGITS_DTYPE = {"llama": "f32", "gemma3": "f16", "qwen2": "f16"}

# std of the B entries per architecture and adapter; A entries have std 1/sqrt(n_in). Chosen so
# that the adapters move the logits clearly (cosine to base ~0.6-0.999, some top-10 reshuffling,
# a few top-1 changes on Gemma) without wrecking the model (Gemma 3 reacts far more strongly than
# SmolLM2, whose top-1 survives even much larger adapters). Qwen's (rank 4 / 2, every 3rd layer
# only): cosine to base 0.89-0.98 per adapter (0.77-0.79 stacked), clearly under the tests' 0.99 bound.
SIGMA_B = {"llama": {"attn_r8": 0.04, "ffn_r16": 0.08},
           "gemma3": {"attn_r8": 0.015, "ffn_r16": 0.03},
           "qwen2": {"down_r4": 0.15, "all_r2": 0.3}}

ADAPTERS = {
    # name: rank, alpha, target tensors (per layer), stored type
    "attn_r8": {"rank": 8, "alpha": 16.0, "targets": ["attn_q", "attn_k", "attn_v", "attn_output"],
                "dtype": "f32"},
    "ffn_r16": {"rank": 16, "alpha": 8.0, "targets": ["ffn_gate", "ffn_up", "ffn_down"],
                "dtype": "f16"},
}

CHAT = {
    "llama": "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "gemma3": "<start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n",
}


def prompts(arch):
    return [("short_en", "The quick brown fox"),
            ("capital", "The capital of France is"),
            ("chat", CHAT[arch])]


SETTINGS = [
    # name, [(adapter, user_scale)]
    ("base", []),
    ("attn_r8_x0.5", [("attn_r8", 0.5)]),
    ("attn_r8_x1", [("attn_r8", 1.0)]),
    ("ffn_r16_x1", [("ffn_r16", 1.0)]),
    ("stack", [("attn_r8", 1.0), ("ffn_r16", 0.5)]),
]

# --- Qwen2.5-Coder 0.5B Instruct (arch qwen2): the regression case for LoRA on long rows. ffn_down's
# lora_a has n_in = n_ff = 4864, and a prefill batch of >= ~54 tokens made nomoat's per-invocation
# loop over it overrun llvmpipe's 65,535-iteration limit. So: one adapter on ffn_down alone, one on
# every projection kind, prompts of 64 tokens (one full 64-token nomoat prefill batch) and 96 (two
# batches) besides a short one. Small F16 adapters of low rank on every 3rd layer keep the files small.
QWEN_ADAPTERS = {
    "down_r4": {"rank": 4, "alpha": 8.0, "targets": ["ffn_down"], "dtype": "f16"},
    "all_r2": {"rank": 2, "alpha": 1.0,
               "targets": ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"],
               "dtype": "f16"},
}

QWEN_SETTINGS = [
    ("base", []),
    ("down_r4_x1", [("down_r4", 1.0)]),
    ("all_r2_x1", [("all_r2", 1.0)]),
    ("stack", [("down_r4", 1.0), ("all_r2", 1.0)]),
]

_QWEN_SYSTEM = ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
                "assistant.<|im_end|>\n")

QWEN_PROMPTS = [
    ("short", "def fibonacci(n):"),
    # 64 tokens
    ("chat64", _QWEN_SYSTEM + "<|im_start|>user\nWrite a Python function that returns the n-th "
     "Fibonacci number. Use a simple loop rather than recursion, add type hints and a docstring, and "
     "keep it under ten lines.<|im_end|>\n<|im_start|>assistant\n"),
    # 96 tokens
    ("code96", 'import json\nfrom pathlib import Path\n\n\ndef load_config(path: str) -> dict:\n'
     '    """Read a JSON configuration file and return it as a dictionary.\n\n'
     '    Missing files give an empty configuration; any other error is raised.\n    """\n'
     '    p = Path(path)\n    if not p.exists():\n        return {}\n'
     '    with p.open("r", encoding="utf-8") as f:\n        data = json.load(f)\n'
     '    if not isinstance(data, dict):\n        raise'),
]


def profile(arch):
    """What is generated for a model of this architecture: adapters, settings, prompts, the adapter
    the llama.cpp self-checks use, the setting the "repeat" check re-evaluates, the default
    layer stride, and notes added to the JSON."""
    if arch == "qwen2":
        return {"adapters": QWEN_ADAPTERS, "settings": QWEN_SETTINGS, "prompts": QWEN_PROMPTS,
                "check_adapter": "down_r4", "repeat_scale": 1.0, "layer_stride": 3,
                "notes": [
                    "Qwen2.5-Coder 0.5B: regression fixture for LoRA on long rows (ffn_down's lora_a "
                    "has n_in = n_ff = 4864). Prompt 'chat64' is 64 tokens (one full 64-token nomoat "
                    "prefill batch; the bug needed >= ~54 tokens in one batch), 'code96' is 96 "
                    "tokens (two batches). Adapters cover layers 0, 3, ..., 21 only (layer_stride 3)."]}
    return {"adapters": ADAPTERS, "settings": SETTINGS, "prompts": prompts(arch),
            "check_adapter": "attn_r8", "repeat_scale": 0.5, "layer_stride": 1, "notes": []}


# ---------------------------------------------------------------------------------------------
# adapters


def base_shapes(model_path):
    """name -> (n_in, n_out) for every 2-D tensor of the base model (GGUF ne order)."""
    r = gguf.GGUFReader(str(model_path))
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    n_layer = int(r.fields[f"{arch}.block_count"].parts[-1][0])
    shapes = {t.name: (int(t.shape[0]), int(t.shape[1])) for t in r.tensors if len(t.shape) == 2}
    return arch, n_layer, shapes


def make_pairs(stem, adapter, n_layer, shapes, sigma_b, layer_stride=1, spec=None):
    """[(base_name, A (r, n_in) f32|f16, B (n_out, r) f32|f16)] for one adapter, covering layers
    0, layer_stride, 2*layer_stride, ... spec: the adapter's entry (default ADAPTERS[adapter])."""
    spec = spec or ADAPTERS[adapter]
    rng = np.random.default_rng(zlib.crc32(f"{stem}.{adapter}".encode()))
    np_dtype = np.float32 if spec["dtype"] == "f32" else np.float16
    r = spec["rank"]
    pairs = []
    for il in range(0, n_layer, layer_stride):
        for t in spec["targets"]:
            name = f"blk.{il}.{t}.weight"
            n_in, n_out = shapes[name]
            a = (rng.standard_normal((r, n_in)) / np.sqrt(n_in)).astype(np_dtype)
            b = (rng.standard_normal((n_out, r)) * sigma_b).astype(np_dtype)
            pairs.append((name, a, b))
    return pairs


def write_adapter(path, arch, pairs, alpha, name):
    """llama.cpp GGUF LoRA adapter. alpha=None leaves adapter.lora.alpha out."""
    w = gguf.GGUFWriter(str(path), arch)  # writes general.architecture
    w.add_type(gguf.GGUFType.ADAPTER)  # general.type = "adapter"
    w.add_name(name)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    if alpha is not None:
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    for base, a, b in pairs:
        # numpy (r, n_in) -> GGUF dims [n_in, r]; numpy (n_out, r) -> GGUF dims [r, n_out]
        w.add_tensor(f"{base}.lora_a", np.ascontiguousarray(a))
        w.add_tensor(f"{base}.lora_b", np.ascontiguousarray(b))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def check_adapter_file(path, arch, pairs, alpha):
    """Read the file back with gguf-py and check metadata and GGUF dims."""
    r = gguf.GGUFReader(str(path))

    def s(key):
        return bytes(r.fields[key].parts[-1]).decode()

    assert s("general.architecture") == arch and s("general.type") == "adapter"
    assert s("adapter.type") == "lora"
    if alpha is not None:
        assert float(r.fields["adapter.lora.alpha"].parts[-1][0]) == alpha
    tens = {t.name: t for t in r.tensors}
    assert len(tens) == 2 * len(pairs)
    for base, a, b in pairs:
        ta, tb = tens[base + ".lora_a"], tens[base + ".lora_b"]
        assert [int(x) for x in ta.shape] == [a.shape[1], a.shape[0]], (base, ta.shape)
        assert [int(x) for x in tb.shape] == [b.shape[1], b.shape[0]], (base, tb.shape)
        assert ta.shape[1] == tb.shape[0]


# ---------------------------------------------------------------------------------------------
# llama.cpp


def versus(logits, ref):
    """How far logits moved from ref (both f32 [n_vocab])."""
    t_new = [e["id"] for e in top_k(logits)]
    t_ref = [e["id"] for e in top_k(ref)]
    return {"cosine": cos(logits, ref),
            "max_abs": float(np.max(np.abs(logits.astype(np.float64) - ref))),
            "top1": t_new[0], "top1_ref": t_ref[0], "top1_changed": t_new[0] != t_ref[0],
            "top10_overlap": len(set(t_new) & set(t_ref))}


_log_lines = []


@llama_cpp.llama_log_callback
def _capture_log(level, text, user_data):
    _log_lines.append((int(level), text.decode("utf-8", errors="replace")))


def load_adapter(llm, path):
    """llama_adapter_lora_init; returns (pointer or None, error lines logged by llama.cpp)."""
    _log_lines.clear()
    llama_cpp.llama_log_set(_capture_log, ctypes.c_void_p(0))
    try:
        p = llama_cpp.llama_adapter_lora_init(llm._model.model, str(path).encode())
    finally:
        llama_cpp.llama_log_set(llama_cpp._logger.llama_log_callback, ctypes.c_void_p(0))
    # ggml_log_level in this ggml: 1 debug, 2 info, 3 warn, 4 error, 5 continuation
    errors = [t.strip() for lvl, t in _log_lines if lvl == 4 and t.strip()]
    return (p if p else None), errors


def set_adapters(llm, pairs):
    """pairs: [(adapter pointer, user scale)]; [] detaches everything."""
    n = len(pairs)
    arr = (llama_cpp.llama_adapter_lora_p_ctypes * max(n, 1))(*[p for p, _ in pairs])
    sc = (ctypes.c_float * max(n, 1))(*[s for _, s in pairs])
    rc = llama_cpp.llama_set_adapters_lora(llm._ctx.ctx, arr, n, sc)
    assert rc == 0, rc


def eval_last(llm, ids):
    """Fresh KV cache, whole prompt in one llama_decode; last position's logits (f32)."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[len(ids) - 1], dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# numpy float32 cross-check


def f32_with_lora(m, loras):
    """Patch f32_forward.Model.mm: y = x W^T + sum s * (x A^T) B^T. loras: [(pairs, s_eff)]."""
    extra = {}
    for pairs, s_eff in loras:
        for base, a, b in pairs:
            extra.setdefault(base, []).append((a.astype(np.float32), b.astype(np.float32),
                                               np.float32(s_eff)))
    base_mm = Model.mm

    def mm(x, name):
        y = base_mm(m, x, name)
        for a, b, s in extra.get(name, []):
            y = y + s * ((x @ a.T) @ b.T)
        return y.astype(np.float32)

    m.mm = mm


def delta_stats(d_cpp, d_f32):
    d_cpp, d_f32 = d_cpp.astype(np.float64), d_f32.astype(np.float64)
    return {"delta_cosine": float(d_cpp @ d_f32 / (np.linalg.norm(d_cpp) * np.linalg.norm(d_f32))),
            "delta_ratio": float(d_cpp @ d_f32 / (d_f32 @ d_f32))}


# ---------------------------------------------------------------------------------------------


def run_model(name, do_f32, tmp, layer_stride=None):
    path = models_dir() / name
    stem = path.stem
    print(f"== {name}", flush=True)
    arch, n_layer, shapes = base_shapes(path)
    dtype = LOGITS_DTYPE[arch]
    prof = profile(arch)
    ADAPTERS, SETTINGS, PROMPTS = prof["adapters"], prof["settings"], prof["prompts"]  # noqa: N806
    if layer_stride is None:
        layer_stride = prof["layer_stride"]

    # --- adapters
    pairs, adapter_docs, files = {}, [], {}
    for aname, spec in ADAPTERS.items():
        sigma_b = SIGMA_B[arch][aname]
        pairs[aname] = make_pairs(stem, aname, n_layer, shapes, sigma_b, layer_stride, spec)
        f = OUT_DIR / f"{stem}.{aname}.gguf"
        write_adapter(f, arch, pairs[aname], spec["alpha"], f"nomoat test LoRA {aname}")
        check_adapter_file(f, arch, pairs[aname], spec["alpha"])
        files[aname] = f
        adapter_docs.append({
            "name": aname, "file": f.name, "rank": spec["rank"], "alpha": spec["alpha"],
            "alpha_over_rank": spec["alpha"] / spec["rank"], "dtype": spec["dtype"],
            "targets": spec["targets"], "layer_stride": layer_stride, "n_pairs": len(pairs[aname]),
            "tensors_covered": [p[0] for p in pairs[aname]],
            "init": {"seed": zlib.crc32(f"{stem}.{aname}".encode()), "generator": "numpy PCG64",
                     "lora_a": "standard_normal((r, n_in)) / sqrt(n_in)",
                     "lora_b": f"standard_normal((n_out, r)) * {sigma_b}"},
            "bytes": f.stat().st_size, "sha256": sha256(f),
        })
        print(f"  wrote {f.name} ({f.stat().st_size} bytes, {len(pairs[aname])} pairs)", flush=True)

    wrong = None
    if arch == "llama":
        # negative fixture: blk.0.attn_q lora_a with n_in 640 (the model's is 576)
        rng = np.random.default_rng(zlib.crc32(f"{stem}.wrong_shape".encode()))
        wp = []
        for t in ["attn_q", "attn_k", "attn_v"]:
            base = f"blk.0.{t}.weight"
            n_in, n_out = shapes[base]
            if t == "attn_q":
                n_in = 640
            wp.append((base, (rng.standard_normal((8, n_in)) / np.sqrt(n_in)).astype(np.float32),
                       (rng.standard_normal((n_out, 8)) * SIGMA_B[arch]["attn_r8"]).astype(np.float32)))
        fw = OUT_DIR / f"{stem}.wrong_shape.gguf"
        write_adapter(fw, arch, wp, 16.0, "nomoat test LoRA wrong_shape")
        check_adapter_file(fw, arch, wp, 16.0)
        wrong = {"file": fw.name, "rank": 8, "alpha": 16.0, "dtype": "f32",
                 "tensors": [t for b, a, bb in wp for t in (
                     {"name": f"{b}.lora_a", "gguf_dims": [a.shape[1], a.shape[0]]},
                     {"name": f"{b}.lora_b", "gguf_dims": [bb.shape[1], bb.shape[0]]})],
                 "base_blk.0.attn_q.weight_gguf_dims": list(shapes["blk.0.attn_q.weight"]),
                 "bytes": fw.stat().st_size, "sha256": sha256(fw)}
        files["wrong_shape"] = fw

    # --- llama.cpp
    llm = make_llm(path, N_CTX)
    md = llm.metadata
    add_bos = md.get("tokenizer.ggml.add_bos_token", "false") == "true"
    ptr = {}
    for aname in ADAPTERS:
        p, errs = load_adapter(llm, files[aname])
        assert p is not None, (aname, errs)
        ptr[aname] = p
    if wrong is not None:
        p, errs = load_adapter(llm, files["wrong_shape"])
        wrong["llama_cpp_accepts"] = p is not None
        wrong["llama_cpp_errors"] = errs
        print(f"  wrong_shape: accepted={p is not None} errors={errs}", flush=True)
        assert p is None

    def run(ids, setting):
        set_adapters(llm, [(ptr[a], s) for a, s in setting])
        return eval_last(llm, ids)

    cases, logits = [], {}
    for pname, prompt in PROMPTS:
        ids = llm.tokenize(prompt.encode(), add_bos=add_bos, special=True)
        base_logits = None
        for sname, setting in SETTINGS:
            last = run(ids, setting)
            seq = eval_one_by_one(llm, ids)  # same adapters still attached
            logits[(pname, sname)] = (ids, last)
            if sname == "base":
                base_logits = last
            fname = write_logits(OUT_DIR / f"{stem}.{pname}.{sname}.logits.{dtype}", last, dtype)
            case = {
                "name": f"{pname}.{sname}",
                "prompt_name": pname,
                "prompt": prompt,
                "add_bos": add_bos,
                "parse_special": True,
                "n_ctx": N_CTX,
                "prompt_tokens": [int(t) for t in ids],
                "setting": {"name": sname, "adapters": [
                    {"file": files[a].name, "scale": s,
                     "effective_scale": s * ADAPTERS[a]["alpha"] / ADAPTERS[a]["rank"]}
                    for a, s in setting]},
                "logits_file": fname,
                "logits_dtype": dtype,
                "top10": top_k(last),
                "top2_margin": margin(last),
                "self_consistency": {"cosine": cos(seq, last),
                                     "max_abs": float(np.max(np.abs(seq.astype(np.float64) - last))),
                                     "argmax_equal": int(np.argmax(seq)) == int(np.argmax(last))},
            }
            if sname != "base":
                case["versus_base"] = versus(last, base_logits)
            cases.append(case)
            vb = case.get("versus_base")
            print(f"  {pname:9s} {sname:13s} top1={int(np.argmax(last)):6d} margin={margin(last):6.3f} "
                  f"self-cons={case['self_consistency']['cosine']:.5f}"
                  + (f"  vs base: cos={vb['cosine']:.4f} max_abs={vb['max_abs']:.3f} "
                     f"top1_changed={vb['top1_changed']} top10_overlap={vb['top10_overlap']}" if vb else ""),
                  flush=True)

    # --- llama.cpp self-checks (nothing stored but the numbers)
    checks = []

    def check(name, what, a, b, expect_identical):
        ident = bool(np.array_equal(a, b))
        d = float(np.max(np.abs(a.astype(np.float64) - b)))
        c = cos(a, b)
        checks.append({"name": name, "what": what, "bitwise_identical": ident, "max_abs": d,
                       "cosine": c, "top1_equal": int(np.argmax(a)) == int(np.argmax(b))})
        print(f"  check {name}: identical={ident} max_abs={d:.3g} cos={c:.6f}", flush=True)
        if expect_identical:
            assert ident, name

    # temporary adapters (not committed) sharing the check adapter's A and B (attn_r8 for
    # SmolLM2 and Gemma 3: alpha 16, rank 8)
    c = prof["check_adapter"]
    c_alpha, c_rank = ADAPTERS[c]["alpha"], ADAPTERS[c]["rank"]
    h_alpha, ar = c_alpha / 2, c_alpha / c_rank  # alpha8 for attn_r8; its user scale 2 = alpha/rank
    t_half = Path(tmp) / f"{stem}.{c}.alpha{h_alpha:g}.gguf"
    write_adapter(t_half, arch, pairs[c], h_alpha, "tmp")
    t_noalpha = Path(tmp) / f"{stem}.{c}.noalpha.gguf"
    write_adapter(t_noalpha, arch, pairs[c], None, "tmp")
    t_copy = Path(tmp) / f"{stem}.{c}.copy.gguf"
    write_adapter(t_copy, arch, pairs[c], c_alpha, "tmp")
    t_zero_b = Path(tmp) / f"{stem}.{c}.zero_b.gguf"
    write_adapter(t_zero_b, arch, [(n, a, np.zeros_like(b)) for n, a, b in pairs[c]], c_alpha, "tmp")
    for k, f in [("half_alpha", t_half), ("noalpha", t_noalpha), ("copy", t_copy), ("zero_b", t_zero_b)]:
        p, errs = load_adapter(llm, f)
        assert p is not None, (k, errs)
        ptr[k] = p

    rs = prof["repeat_scale"]
    for pname, _ in PROMPTS:
        ids, base = logits[(pname, "base")]
        _, a1 = logits[(pname, f"{c}_x1")]
        _, a_rs = logits[(pname, f"{c}_x{rs:g}")]
        check(f"{pname}.scale0", f"{c} at user scale 0.0 vs no adapter (llama.cpp drops "
              "zero-scale adapters from the context)", run(ids, [(c, 0.0)]), base, True)
        check(f"{pname}.zero_b", f"{c}'s A with B = 0 at scale 1 (LoRA nodes in the graph, "
              "delta exactly 0) vs no adapter", run(ids, [("zero_b", 1.0)]), base, True)
        check(f"{pname}.alpha{h_alpha:g}_x2", f"same A,B with alpha {h_alpha:g} at user scale 2 "
              f"({h_alpha:g}/{c_rank}*2 = {2 * h_alpha / c_rank:g}) vs {c} "
              f"(alpha {c_alpha:g}) at user scale 1 ({c_alpha:g}/{c_rank}*1 = {ar:g})",
              run(ids, [("half_alpha", 2.0)]), a1, True)
        check(f"{pname}.noalpha_x{ar:g}", f"same A,B without adapter.lora.alpha at user scale {ar:g} "
              f"(effective scale = user scale) vs {c} at user scale 1",
              run(ids, [("noalpha", ar)]), a1, True)
        check(f"{pname}.same_tensor_stack", f"{c} x0.5 + an identical copy x0.5 (both on the "
              f"same tensors: deltas add) vs {c} x1 (equal up to f32 addition order)",
              run(ids, [(c, 0.5), ("copy", 0.5)]), a1, False)
        check(f"{pname}.repeat_x{rs:g}", f"{c} x{rs:g} re-evaluated after other settings vs the "
              f"stored {c} x{rs:g} logits (switching adapters leaves no state behind)",
              run(ids, [(c, rs)]), a_rs, True)
        check(f"{pname}.detach", "adapters detached again (empty set) vs the first base "
              "evaluation", run(ids, []), base, True)
    del llm

    # --- numpy float32 cross-check
    f32 = None
    if do_f32:
        m = Model(path)
        s_ar = {a: ADAPTERS[a]["alpha"] / ADAPTERS[a]["rank"] for a in ADAPTERS}
        per_case = []
        for pname, _ in PROMPTS:
            ids, cpp_base = logits[(pname, "base")]
            m.mm = lambda x, n: Model.mm(m, x, n)
            f_base = m.forward(ids, last_only=True)[0]
            for sname, setting in SETTINGS[1:]:
                _, cpp = logits[(pname, sname)]
                f32_with_lora(m, [(pairs[a], s * s_ar[a]) for a, s in setting])
                f_ad = m.forward(ids, last_only=True)[0]
                # the same with the effective scale taken as the bare user scale (wrong hypothesis)
                f32_with_lora(m, [(pairs[a], s) for a, s in setting])
                f_alt = m.forward(ids, last_only=True)[0]
                d = delta_stats(cpp - cpp_base, f_ad - f_base)
                e = {"case": f"{pname}.{sname}", "cosine_base": cos(f_base, cpp_base),
                     "cosine": cos(f_ad, cpp), "max_abs": float(np.max(np.abs(f_ad.astype(np.float64) - cpp))),
                     "top1_f32": int(np.argmax(f_ad)), "top1_llamacpp": int(np.argmax(cpp)),
                     "llamacpp_margin": margin(cpp),
                     "delta_vs_base": d,
                     "cosine_if_scale_were_user_scale": cos(f_alt, cpp)}
                per_case.append(e)
                print(f"  f32 {e['case']:22s} cos={e['cosine']:.5f} (base {e['cosine_base']:.5f}) "
                      f"top1 {e['top1_f32']}/{e['top1_llamacpp']} delta cos={d['delta_cosine']:.4f} "
                      f"ratio={d['delta_ratio']:.3f} | bare-scale hypothesis: cos={e['cosine_if_scale_were_user_scale']:.5f}",
                      flush=True)
        del m
        f32 = {
            "what": ("tests/reference/f32_forward.py with every adapted matmul replaced by "
                     "x W^T + s_eff (x A^T) B^T in float32 (A, B as stored, F16 ones upcast), "
                     "s_eff = user_scale * alpha / rank; last position. cosine / max_abs: f32+LoRA vs "
                     "llama.cpp+LoRA (cosine_base: the same for the base model, i.e. the noise "
                     "floor). delta_vs_base compares (llama.cpp adapter - llama.cpp base) with "
                     "(f32 adapter - f32 base): delta_ratio = <d_cpp, d_f32> / <d_f32, d_f32>; it is "
                     "noisy because both bases already differ by the base-model noise. "
                     "cosine_if_scale_were_user_scale: f32 run with s_eff = user_scale (alpha/rank "
                     "ignored) vs llama.cpp, to show the comparison tells the conventions apart."),
            "per_case": per_case,
        }

    doc = {
        "model": name,
        "model_sha256": sha256(path),
        "architecture": arch,
        "n_vocab": int(len(logits[(PROMPTS[0][0], "base")][1])),
        "llama_cpp_version": llama_cpp.__version__,
        "llama_cpp_system_info": llama_cpp.llama_print_system_info().decode().strip(),
        "notes": [
            "Generated by tests/reference/make_lora_refs.py (see its docstring); do not edit.",
            "Adapter files: llama.cpp GGUF LoRA format. KV general.architecture = base arch, "
            "general.type = 'adapter', adapter.type = 'lora', adapter.lora.alpha (f32). Tensors "
            "'<base tensor name>.lora_a' with GGUF dims [n_in, r] and '.lora_b' with GGUF dims "
            "[r, n_out], where the base tensor has GGUF dims [n_in, n_out].",
            "llama.cpp semantics (build_lora_mm): y = W x + sum over attached adapters covering W "
            "of s_eff * B (A x), s_eff = user_scale * alpha / rank (rank = lora_b's GGUF ne[0]); "
            "s_eff = user_scale when alpha is 0 or missing. An adapter with user_scale 0.0 is "
            "removed from the context. Stacked adapters add their deltas (to the same tensor too). "
            "Only tensors named in the adapter are changed; norms and embeddings untouched here.",
            "setting.adapters[].scale is the user scale passed to llama_set_adapters_lora; "
            "effective_scale = scale * alpha / rank is what multiplies B (A x).",
            f"F16 adapters ({', '.join(a for a in ADAPTERS if ADAPTERS[a]['dtype'] == 'f16')}): "
            "llama.cpp's CPU F16 mul_mat rounds x and A x to f16 before "
            "each product (accumulates in f32); F32 adapters are f32 throughout.",
            "logits files: raw little-endian, n_vocab values of the last prompt position, dtype "
            "per logits_dtype (f16 = rounded from the f32 logits, round-to-nearest-even). top10 / "
            "top2_margin / versus_base come from the unrounded f32 logits.",
            "llama.cpp settings: n_threads=2, n_ctx=n_batch=n_ubatch=512, KV cache f16, flash "
            "attention off, CPU backend, whole prompt in one llama_decode from an empty KV cache. "
            "Base-model activations entering quantized matmuls are quantized to Q8 by llama.cpp; "
            "the LoRA branch sees the unquantized activations.",
            "versus_base: cosine / max |diff| / top-1 / top-10 overlap against the same prompt's "
            "base case.",
            "self_consistency: llama.cpp's own token-by-token (one llama_decode per token, same "
            "adapters) vs batched last-position logits: the noise floor to judge another "
            "implementation against. With adapters attached it is visibly worse than without "
            "(down to ~0.994 cosine on SmolLM2 'The quick brown fox').",
        ] + prof["notes"],
        "adapters": adapter_docs,
        "settings": [{"name": s, "adapters": [{"adapter": a, "scale": sc} for a, sc in st]}
                     for s, st in SETTINGS],
        "cases": cases,
        "checks": checks,
    }
    if wrong is not None:
        doc["wrong_shape"] = wrong
    if f32 is not None:
        doc["f32_vs_llamacpp"] = f32
    (OUT_DIR / f"{stem}.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    print(f"  wrote {stem}.json", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", help="model file name (repeatable); default: all three")
    ap.add_argument("--no-f32", action="store_true", help="skip the numpy float32 cross-check")
    ap.add_argument("--layer-stride", type=int, default=None,
                    help="adapters cover layers 0, k, 2k, ... (default: 1, every layer, for SmolLM2 "
                         "and Gemma 3; 3 for Qwen2.5-Coder; a larger k shrinks the adapter files "
                         "about k-fold)")
    args = ap.parse_args()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.model or MODELS:
            run_model(name, not args.no_f32, tmp, args.layer_stride)


if __name__ == "__main__":
    main()
